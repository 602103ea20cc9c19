"""InMemoryTransport: the embedded default, with the same delivery rules as the brokers.

One process, no server. Events are delivered as the very objects that were
published (no copy, no codec), each handler through its own ordered mailbox.
Two `InMemoryTransport` objects do not talk to each other; share one object
between the apps of a process instead.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from loom_ha._handlers import DeliveryCounters, Handler, HandlerTable, Mailbox
from loom_ha._tasks import TaskSupervisor
from loom_ha.topics import parse_pattern, validate_topic
from loom_ha.transport import (
    Capabilities,
    GroupRule,
    Transport,
    TransportState,
    TransportStatistics,
    loom_request_groups,
    require_connected,
)


class InMemoryTransport(Transport):
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
        self._group_rule = group_rule
        self._state = TransportState.NEW
        self._table = HandlerTable()
        self._mailboxes: dict[Handler, Mailbox] = {}
        self._counters = DeliveryCounters()
        self._tasks = TaskSupervisor("loom_ha.memory")

    @override
    async def connect(self) -> None:
        if self._state is TransportState.CONNECTED:
            return
        self._tasks.reopen()
        self._state = TransportState.CONNECTED

    @override
    async def disconnect(self) -> None:
        if self._state in (TransportState.NEW, TransportState.DISCONNECTED):
            return
        self._state = TransportState.DISCONNECTED
        self._table.clear()
        self._mailboxes.clear()
        await self._tasks.aclose()

    @override
    async def publish(self, topic: str, event: Any) -> None:
        require_connected(self._state, "memory")
        validate_topic(topic)
        self._counters.published += 1
        table, mailboxes = self._table, self._mailboxes
        for key in table.keys_matching(topic):
            for handler in table.recipients(key, topic):
                mailboxes[handler].put(topic, event)

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        require_connected(self._state, "memory")
        parse_pattern(topic)  # validate before touching any state
        if group is None and self._group_rule is not None:
            group = self._group_rule(topic)
        self._table.add(topic, handler, group)
        if handler not in self._mailboxes:
            self._mailboxes[handler] = Mailbox(handler, self._tasks, self._counters)

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        self._table.remove(topic, handler)
        if not self._table.has_handler(handler):
            mailbox = self._mailboxes.pop(handler, None)
            if mailbox is not None:
                await mailbox.close()

    @override
    def statistics(self) -> TransportStatistics:
        c = self._counters
        return TransportStatistics(
            backend="memory",
            state=self._state,
            endpoint="memory://",
            subscriptions=len(self._table.keys()),
            handlers=self._table.handler_count,
            queued=sum(m.depth for m in self._mailboxes.values()),
            published=c.published,
            delivered=c.delivered,
            handler_errors=c.handler_errors,
        )
