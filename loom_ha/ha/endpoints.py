"""Where HATransport's inner transports come from, and how it follows one that reconnects.

An inner transport that is gone for good (closed, disconnected) is replaced by a fresh one
from the next endpoint's factory; one that reconnects by itself (its client library does) is
followed through its state announcements until it is back or the wait is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence

from loom_ha._tasks import TaskSupervisor, wait_event
from loom_ha.errors import ConfigurationError, ConnectionLostError
from loom_ha.transport import StateListener, Transport, TransportState

__all__ = ["DEAD_INNER", "Endpoints", "InnerWatch", "TransportFactory", "follow_reconnect"]

TransportFactory = Callable[[], Transport]

DEAD_INNER = (TransportState.CLOSED, TransportState.DISCONNECTED, TransportState.NEW)
"""States of an inner transport that will not come back by itself."""


class Endpoints:
    """The endpoints' factories, tried in turn (one endpoint: the same factory again).

    Raises:
        ConfigurationError: no endpoint.
    """

    def __init__(self, target: Transport | TransportFactory | Sequence[TransportFactory]) -> None:
        if isinstance(target, Transport):
            fixed = target
            self._factories: list[TransportFactory] = [lambda: fixed]
        elif callable(target):
            self._factories = [target]
        else:
            self._factories = list(target)
        if not self._factories:
            raise ConfigurationError("HATransport needs at least one endpoint")
        self._order = itertools.cycle(range(len(self._factories)))

    def next_transport(self) -> Transport:
        """A new inner transport from the next endpoint."""
        return self._factories[next(self._order)]()


class InnerWatch:
    """Tells `on_change` every state the current inner transport announces.

    An inner transport that does not announce (`Transport.add_state_listener` returns None)
    is looked at every `interval` seconds instead, in a task of `tasks`.
    """

    def __init__(self, on_change: StateListener, tasks: TaskSupervisor, interval: float) -> None:
        if interval <= 0:
            raise ConfigurationError(f"health_interval must be > 0, got {interval}")
        self._on_change, self._tasks, self._interval = on_change, tasks, interval
        self._stop: Callable[[], None] | None = None

    def follow(self, inner: Transport) -> None:
        """Watch `inner` (and stop watching the one before)."""
        self.stop()
        self._stop = inner.add_state_listener(self._on_change)
        if self._stop is None:
            poll = self._tasks.spawn(self._poll(inner), name="health")

            def stop_polling() -> None:
                poll.cancel()  # awaited by the supervisor's aclose()

            self._stop = stop_polling

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    async def _poll(self, inner: Transport) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._on_change(inner.statistics().state)


async def follow_reconnect(inner: Transport, wait: float) -> None:
    """Follow `inner` while it reconnects by itself, for up to `wait` s.

    Woken by its state announcements; a transport that does not announce
    (`Transport.add_state_listener` returns None) is looked at every 50 ms instead.

    Raises:
        ConnectionLostError: it is gone for good, or not back within `wait`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(wait, 0.05)
    changed = asyncio.Event()
    remove = inner.add_state_listener(lambda _: changed.set())
    try:
        with contextlib.suppress(Exception):
            # A round trip makes a lazily reconnecting client try now.
            async with asyncio.timeout(max(0.05, deadline - loop.time())):
                await inner.ping()
        while True:
            changed.clear()  # before reading the state: a change after the read wakes us
            state = inner.statistics().state
            if state is TransportState.CONNECTED:
                return
            left = deadline - loop.time()
            if state in DEAD_INNER or left <= 0:
                raise ConnectionLostError(f"inner transport is {state.value}")
            await wait_event(changed, left if remove is not None else min(left, 0.05))
    finally:
        if remove is not None:
            remove()
