"""Which RESP parser redis-py runs in a bench job: hiredis (C) or redis-py's pure-Python one.

redis-py decides once, when `redis.utils` is imported: if hiredis imports, every connection
parses replies with it and packs commands with it. ``python`` makes hiredis unimportable in
this process before redis-py is imported, so the whole job (loom-ha's rows, the raw
clients' and FastStream's) runs exactly as it would without the package. A
``parser_class=`` argument would not do: it swaps the reply parser only, commands are still
packed by hiredis, and only clients that are handed the argument would get it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from loom_ha._loop import FAST_HINT
from loom_ha.errors import ConfigurationError

__all__ = ["PARSER_CHOICES", "parsers_used", "use_redis_parser"]

PARSER_CHOICES = ("hiredis", "python")


def use_redis_parser(choice: str | None) -> str:
    """Make redis-py in this process use `choice`'s parser; returns what it uses, in words.

    Args:
        choice: ``"hiredis"``, ``"python"``, or None for whatever is installed (hiredis
            when redis-py accepts the installed version).

    Raises:
        ConfigurationError: `choice` is unknown; ``hiredis`` was asked for and redis-py
            cannot use it; ``python`` was asked for after redis-py was imported with hiredis
            in this process (the choice must come before the first ``import redis``).
    """
    if choice not in (None, *PARSER_CHOICES):
        raise ConfigurationError(
            f"--redis-parser={choice!r} is not a parser: use {', '.join(PARSER_CHOICES)}"
        )
    if choice == "python" and "redis.utils" not in sys.modules:
        # A None entry makes `import hiredis` raise ImportError, which redis.utils catches
        # (documented for sys.modules; typeshed types the values as modules only).
        sys.modules["hiredis"] = None  # type: ignore[assignment]
    import redis.utils

    if redis.utils.HIREDIS_AVAILABLE:
        if choice == "python":
            raise ConfigurationError(
                "--redis-parser=python: redis-py was already imported with hiredis in this "
                "process; choose the parser before anything imports redis"
            )
        return f"hiredis {sys.modules['hiredis'].__version__}"
    if choice == "hiredis":
        raise ConfigurationError(
            "--redis-parser=hiredis, but redis-py cannot use hiredis here (not installed, or "
            f"older than redis-py accepts): {FAST_HINT}"
        )
    return "pure Python (redis-py's own; hiredis not loaded)"


@contextlib.contextmanager
def parsers_used() -> Iterator[set[str]]:
    """The class names of the parsers redis-py's asyncio connections get while inside.

    redis-py has no public way to read a connection's parser, so `set_parser` (called when
    a connection is built and when it switches RESP version, never per command) is wrapped
    for the duration and restored after.
    """
    from redis.asyncio.connection import AbstractConnection

    seen: set[str] = set()
    original = AbstractConnection.set_parser

    def recording(self: AbstractConnection, parser_class: Any) -> None:
        seen.add(parser_class.__name__)
        original(self, parser_class)

    AbstractConnection.set_parser = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        AbstractConnection.set_parser = original  # type: ignore[method-assign]
