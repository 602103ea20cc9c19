"""Which event loop loom-ha's own entry points run on: uvloop when installed, unless turned off.

The CLI (`--loop`), the demo and the pytest plugin (`--loom-ha-loop`) all choose here, from
the flag, else ``$LOOM_HA_LOOP``, else ``auto`` (uvloop if it can be imported). Apps choose
their own loop: ``uvloop.run(main())``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from loom_ha.errors import ConfigurationError

__all__ = ["LOOP_CHOICES", "LOOP_ENV", "EventLoopChoice", "choose_loop", "run"]

LOOP_ENV = "LOOM_HA_LOOP"
LOOP_CHOICES = ("auto", "asyncio", "uvloop")
FAST_HINT = "pip install 'loom-ha[fast]'"

T = TypeVar("T")


@dataclass(frozen=True)
class EventLoopChoice:
    """An event loop to run on: its `name`, a one-line `description` and its `factory`."""

    name: Literal["asyncio", "uvloop"]
    description: str  # e.g. "uvloop 0.23.0", shown by the CLI and the pytest header
    factory: Callable[[], asyncio.AbstractEventLoop]

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run `main` to completion on a new loop of this kind, like `asyncio.run`."""
        # asyncio: no factory, so the Runner installs its loop as the thread's current one,
        # exactly as asyncio.run does. uvloop: what uvloop.run() does, Runner(loop_factory=...).
        factory = self.factory if self.name == "uvloop" else None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)


def _asyncio(note: str = "") -> EventLoopChoice:
    return EventLoopChoice("asyncio", f"asyncio{note}", asyncio.new_event_loop)


def _uvloop() -> EventLoopChoice | None:
    try:
        import uvloop
    except ImportError:
        return None
    version = getattr(uvloop, "__version__", "?")  # not in uvloop's typed exports
    return EventLoopChoice("uvloop", f"uvloop {version}", uvloop.new_event_loop)


def choose_loop(
    flag: str | None = None,
    *,
    flag_name: str = "--loop",
    env: Mapping[str, str] | None = None,
    default: str = "auto",
) -> EventLoopChoice:
    """The loop asked for by `flag`, else ``$LOOM_HA_LOOP``, else `default` (``auto``).

    ``auto`` is uvloop when it can be imported, else asyncio; ``asyncio`` turns uvloop off;
    ``uvloop`` insists on it.

    Raises:
        ConfigurationError: the value is not one of auto, asyncio, uvloop, or ``uvloop`` was
            asked for and is not installed (naming the flag or variable that asked).
    """
    environ = os.environ if env is None else env
    if flag:
        value, source = flag, flag_name
    elif environ.get(LOOP_ENV, "").strip():
        value, source = environ[LOOP_ENV].strip(), LOOP_ENV
    else:
        value, source = default, "the default"
    if value not in LOOP_CHOICES:
        raise ConfigurationError(
            f"{source}={value!r} is not an event loop: use {', '.join(LOOP_CHOICES)}"
        )
    if value == "asyncio":
        return _asyncio()
    fast = _uvloop()
    if fast is not None:
        return fast
    if value == "uvloop":
        raise ConfigurationError(f"{source}=uvloop, but uvloop is not installed: {FAST_HINT}")
    return _asyncio(f"; uvloop is not installed: {FAST_HINT}")


def run(main: Coroutine[Any, Any, T], *, loop: str | None = None) -> T:
    """Run `main` on the loop `choose_loop(loop)` picks, like `asyncio.run`.

    Raises:
        ConfigurationError: as `choose_loop`; `main` is closed first, never left unawaited.
    """
    try:
        chosen = choose_loop(loop)
    except BaseException:
        main.close()
        raise
    return chosen.run(main)
