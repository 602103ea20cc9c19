"""LocalDelivery: the client-side half every transport shares.

A backend owns the broker side (native subscriptions, reading, acking); this
object owns everything after an event arrived in the process: the handler table,
one ordered mailbox per handler, the default group rule, and the counters. Using
it is what keeps delivery rules identical across memory, Redis and NATS.
"""

from __future__ import annotations

import asyncio
from typing import Any

from loom_ha._handlers import (
    DeliveryCounters,
    Handler,
    HandlerTable,
    Mailbox,
    SubscriptionKey,
    invoke,
)
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
        self._calling: set[asyncio.Task[Any]] = set()  # delivery tasks inside a handler
        self._call_ended: asyncio.Future[None] | None = None  # wakes settle()

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
        return self.deliver(key, topic, event)

    def deliver(self, key: SubscriptionKey, topic: str, event: Any) -> int:
        """`dispatch()` for an event known to match `key` (e.g. it arrived on the exact
        native subscription of an exact pattern); returns how many handlers got it."""
        recipients = self.table.recipients(key, topic)
        mailboxes = self._mailboxes
        for handler in recipients:
            mailboxes[handler].put(topic, event)
        return len(recipients)

    async def deliver_serially(
        self, key: SubscriptionKey, topic: str, event: Any, task: asyncio.Task[Any]
    ) -> None:
        """`deliver()` for backends that run one serial delivery task per key.

        When the key's only handler has no other key and nothing of it is queued or
        running, it runs right here in the caller's task: no task switch and no
        backlog of decoded events (which is what makes the mailbox path slower). A
        slow handler then holds back only its own key, whose events are all its own.
        Otherwise the event goes through the mailboxes as usual. `task` is the
        calling task (``asyncio.current_task()``, looked up once per key by the caller:
        on Python 3.11 that lookup is not free).

        One consequence: a handler that joins a key while the key's only handler is
        inside a call starts receiving once that call has returned.
        """
        handler = self.table.sole(key)
        if handler is None:
            self.deliver(key, topic, event)
            return
        mailbox = self._mailboxes[handler]
        if not mailbox.enter_here():
            mailbox.put(topic, event)
            return
        calling = self._calling
        calling.add(task)
        try:
            await invoke(handler, topic, event, self.counters, task)
        finally:
            mailbox.leave_here()
            calling.discard(task)
            ended = self._call_ended
            if ended is not None:
                self._call_ended = None
                if not ended.done():
                    ended.set_result(None)

    async def settle(self) -> None:
        """Wait until no delivery task is inside a handler (except the caller itself).

        Call it after the native side cancelled its delivery tasks (disconnect), so no
        handler call outlives the transport. Finishes even when the caller is
        cancelled meanwhile (the cancellation is re-raised afterwards).
        """
        current = asyncio.current_task()
        cancelled = False
        while self._calling - {current}:
            ended = self._call_ended
            if ended is None or ended.done():
                ended = self._call_ended = asyncio.get_running_loop().create_future()
            try:
                await asyncio.shield(ended)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def statistics(
        self,
        backend: str,
        state: TransportState,
        *,
        endpoint: str | None,
        reconnects: int = 0,
        pending: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> TransportStatistics:
        """A transport's statistics: its broker-side facts plus this object's counters.

        `pending` counts events the client library holds that were not handed over
        yet (they are part of `queued`).
        """
        c = self.counters
        return TransportStatistics(
            backend=backend,
            state=state,
            endpoint=endpoint,
            subscriptions=len(self.table.keys()),
            handlers=self.table.handler_count,
            queued=self.queued() + pending,
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
