"""LocalDelivery: the client-side half every transport shares.

A backend owns the broker side (native subscriptions, reading, acking); this
object owns everything after an event arrived in the process: the handler table,
one ordered mailbox per handler, the default group rule, and the counters. Using
it is what keeps delivery rules identical across memory, Redis and NATS.
"""

from __future__ import annotations

from typing import Any

from loom_ha._handlers import DeliveryCounters, Handler, HandlerTable, Mailbox, SubscriptionKey
from loom_ha._tasks import TaskSupervisor
from loom_ha.topics import parse_pattern
from loom_ha.transport import GroupRule, TransportState, TransportStatistics


class LocalDelivery:
    """Handler table + mailboxes + counters of one transport."""

    def __init__(self, owner: str, group_rule: GroupRule | None) -> None:
        self.group_rule = group_rule
        self.table = HandlerTable()
        self.counters = DeliveryCounters()
        self.tasks = TaskSupervisor(owner)
        self._mailboxes: dict[Handler, Mailbox] = {}

    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        """The group a subscription joins: the caller's, else the group rule's."""
        parse_pattern(pattern)  # validate before anything else happens
        if group is None and self.group_rule is not None:
            return self.group_rule(pattern)
        return group

    def add(
        self, pattern: str, handler: Handler, group: str | None
    ) -> tuple[SubscriptionKey, bool]:
        """Record a subscription (group already resolved); True when its key is new."""
        key, is_new = self.table.add(pattern, handler, group)
        if handler not in self._mailboxes:
            self._mailboxes[handler] = Mailbox(handler, self.tasks, self.counters)
        return key, is_new

    async def remove(self, pattern: str, handler: Handler) -> list[SubscriptionKey]:
        """Forget a subscription; returns keys left empty (drop their native subscription)."""
        emptied = self.table.remove(pattern, handler)
        if not self.table.has_handler(handler):
            mailbox = self._mailboxes.pop(handler, None)
            if mailbox is not None:
                await mailbox.close()
        return emptied

    def dispatch(self, key: SubscriptionKey, topic: str, event: Any) -> int:
        """Queue an event that arrived for `key`; returns how many handlers got it.

        Events whose topic the key's pattern does not cover (a wider native
        subscription) are counted as filtered and dropped.
        """
        if not key.pattern.matches(topic):
            self.counters.filtered += 1
            return 0
        recipients = self.table.recipients(key, topic)
        mailboxes = self._mailboxes
        for handler in recipients:
            mailboxes[handler].put(topic, event)
        return len(recipients)

    def statistics(
        self,
        backend: str,
        state: TransportState,
        *,
        endpoint: str | None,
        reconnects: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> TransportStatistics:
        """A transport's statistics: its broker-side facts plus this object's counters."""
        c = self.counters
        return TransportStatistics(
            backend=backend,
            state=state,
            endpoint=endpoint,
            subscriptions=len(self.table.keys()),
            handlers=self.table.handler_count,
            queued=self.queued(),
            published=c.published,
            delivered=c.delivered,
            handler_errors=c.handler_errors,
            filtered=c.filtered,
            malformed=c.malformed,
            dead_lettered=c.dead_lettered,
            redelivered=c.redelivered,
            reconnects=reconnects,
            extra=extra,
        )

    def queued(self) -> int:
        """Events waiting in mailboxes."""
        return sum(m.depth for m in self._mailboxes.values())

    async def close(self) -> None:
        """Drop every subscription and stop every mailbox and background task."""
        self.table.clear()
        self._mailboxes.clear()
        await self.tasks.aclose()

    def reopen(self) -> None:
        """Allow tasks again after `close()` (the transport connects anew)."""
        self.tasks.reopen()
