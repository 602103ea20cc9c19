"""InMemoryTransport: the embedded default, with the same delivery rules as the brokers.

One process, no server. Events are delivered as the very objects that were
published (no copy, no codec), each handler through its own ordered mailbox.
Two `InMemoryTransport` objects do not talk to each other; share one object
between the apps of a process instead.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from loom_ha._delivery import LocalDelivery
from loom_ha._handlers import Handler
from loom_ha._state import CellTransport, StateCell
from loom_ha.errors import TransportClosedError
from loom_ha.topics import validate_topic
from loom_ha.transport import (
    Capabilities,
    GroupRule,
    TransportState,
    TransportStatistics,
    loom_request_groups,
    require_connected,
)


class InMemoryTransport(CellTransport):
    """In-process publish/subscribe with groups, ordered per handler and topic."""

    capabilities = Capabilities(
        persistent=False,
        ordered=True,
        at_least_once=False,
        competing_consumers=True,
        replays_history=False,
        native_wildcards=True,
        dedup=False,
        cross_instance=False,
    )

    def __init__(self, *, group_rule: GroupRule | None = loom_request_groups) -> None:
        """
        Args:
            group_rule: picks a group for subscriptions made without one; the
                default puts each ``node.request/<node>`` topic in its own group.
                ``None`` makes every group-less subscription fan-out.
        """
        self._cell = StateCell("loom_ha.memory")
        self._local = LocalDelivery("loom_ha.memory", group_rule)

    @override
    async def connect(self) -> None:
        if self._state is TransportState.CONNECTED:
            return
        if self._state is TransportState.CLOSED:
            raise TransportClosedError("memory transport is closed")
        self._local.reopen()
        self._cell.set(TransportState.CONNECTED)

    @override
    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        return self._local.resolve_group(pattern, group)

    @override
    async def disconnect(self) -> None:
        if self._state in (TransportState.NEW, TransportState.DISCONNECTED, TransportState.CLOSED):
            return
        self._cell.set(TransportState.DISCONNECTED)
        await self._local.close()

    @override
    async def publish(self, topic: str, event: Any) -> None:
        require_connected(self._cell.state, "memory")
        validate_topic(topic)
        local = self._local
        local.counters.published += 1
        for key in local.table.keys_matching(topic):
            local.dispatch(key, topic, event)

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        require_connected(self._state, "memory")
        group = self._local.resolve_group(topic, group)
        self._local.add(topic, handler, group)

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        await self._local.remove(topic, handler)

    @override
    def statistics(self) -> TransportStatistics:
        return self._local.statistics("memory", self._state, endpoint="memory://")
