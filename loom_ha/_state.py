"""StateCell: a transport's current state, its listeners, and a way to wait for CONNECTED.

Every transport keeps its state in one (memory, Redis, NATS, HATransport), so state changes
are announced the same way everywhere and no layer has to poll for them; `CellTransport`
gives a transport that owns its cell the state members that read it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from typing_extensions import override

from loom_ha.transport import StateListener, Transport, TransportState

__all__ = ["CellTransport", "StateCell", "StateListener"]

log = logging.getLogger("loom_ha.state")


class StateCell:
    """Holds one `TransportState` and announces every change."""

    def __init__(self, owner: str, initial: TransportState = TransportState.NEW) -> None:
        self._owner = owner
        self.state = initial
        self._listeners: list[StateListener] = []
        self._connected = asyncio.Event()

    def add_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call `listener(new_state)` on every change; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def set(self, state: TransportState) -> bool:
        """Move to `state` and tell the listeners; False when nothing changed."""
        if state is self.state:
            return False
        log.info("%s: %s -> %s", self._owner, self.state.value, state.value)
        self.state = state
        if state is TransportState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("%s: state listener %r failed", self._owner, listener)
        return True

    async def wait_connected(self) -> None:
        """Return once the state is CONNECTED."""
        await self._connected.wait()


class CellTransport(Transport):
    """A transport whose state lives in its own `StateCell`, ``self._cell``."""

    _cell: StateCell

    @property
    def state(self) -> TransportState:
        """The current state (also in `statistics()`), announced to every state listener."""
        return self._cell.state

    _state = state

    @override
    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        return self._cell.add_listener(listener)

    @override
    def _mark_closed(self) -> None:
        self._cell.set(TransportState.CLOSED)
