"""Where HATransport's inner transports come from, and how it follows one that reconnects.

An inner transport that is gone for good (closed, disconnected) is replaced by a fresh one
from the next endpoint's factory; one that reconnects by itself (its client library does) is
followed closely until it is back or the wait is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence

from loom_ha.errors import ConfigurationError, ConnectionLostError
from loom_ha.transport import Transport, TransportState

__all__ = ["DEAD_INNER", "Endpoints", "TransportFactory", "follow_reconnect"]

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


async def follow_reconnect(inner: Transport, wait: float) -> None:
    """Follow `inner` while it reconnects by itself, closely (every 50 ms), for up to `wait` s.

    Raises:
        ConnectionLostError: it is gone for good, or not back within `wait`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(wait, 0.05)
    while True:
        with contextlib.suppress(Exception):
            # A round trip makes a lazily reconnecting client try now.
            async with asyncio.timeout(max(0.05, deadline - loop.time())):
                await inner.ping()
        state = inner.statistics().state
        if state is TransportState.CONNECTED:
            return
        if state in DEAD_INNER or loop.time() >= deadline:
            raise ConnectionLostError(f"inner transport is {state.value}")
        await asyncio.sleep(0.05)
