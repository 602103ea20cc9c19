"""What happens to one delivery on a durable backend, decided in one place.

Redis Streams and JetStream hold, redeliver and acknowledge in their own ways (a reclaimed
pending entry, a nak with a delay); what happens to an event is the same on both and lives
here. An event whose earlier deliveries were never settled, and used up the budget, goes to
the dead letters unhandled (`DeliveryPolicy.abandoned`). Otherwise each handler of the key
runs (`invoke`), except those that already succeeded on an earlier delivery of the same
message; then the delivery is acknowledged, retried after the policy's backoff (only the
handlers that failed will run), or, once its attempts are used up, dead-lettered with every
handler's error. The backend says how with a `Settlement`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

from loom_ha._handlers import DeliveryCounters, HandlerTable, SubscriptionKey, invoke
from loom_ha.policy import DeliveryPolicy

__all__ = ["DurableDelivery", "Settlement"]


class Settlement(Protocol):
    """How a backend carries out what `DurableDelivery` decided for one delivery."""

    async def ack(self) -> None:
        """Done with it: the broker may forget it."""
        ...

    async def retry(self, delay: float) -> None:
        """Deliver it again (to this consumer or another) after `delay` seconds."""
        ...

    async def dead_letter(self, reason: str, attempts: int) -> None:
        """Store it in the dead-letter place with why, then acknowledge it."""
        ...

    async def pass_on(self) -> None:
        """No handler here takes it (a group member unsubscribing): leave it to another
        member of the group; a fan-out delivery is simply acknowledged."""
        ...


class DurableDelivery:
    """Runs the handlers of one subscription key of a durable backend, delivery by delivery.

    Keeps, per message (`ident`: whatever names it across its redeliveries), the handlers
    that already succeeded while another failed, so a redelivery runs only the failed ones.
    At most `progress_limit` messages are remembered (the oldest go first): the broker lets
    no more be unsettled at once, so none is forgotten while it may come back.
    """

    def __init__(
        self, table: HandlerTable, counters: DeliveryCounters, *, progress_limit: int
    ) -> None:
        self._table, self._counters = table, counters
        self._progress: OrderedDict[Hashable, frozenset[int]] = OrderedDict()
        self._limit = progress_limit

    async def handle(
        self,
        key: SubscriptionKey,
        topic: str,
        event: Any,
        *,
        delivery: int,
        ident: Hashable,
        policy: DeliveryPolicy,
        settle: Settlement,
        around: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ) -> None:
        """Handle the `delivery`-th delivery of `event` (decoded, on a topic `key` covers).

        `around` wraps each handler call (Redis Streams marks its reader as busy in a
        handler, so stopping cancels it instead of waking a read).
        """
        abandoned = policy.abandoned(delivery)
        if abandoned is not None:
            self._progress.pop(ident, None)
            await settle.dead_letter(abandoned, delivery - 1)
            return
        recipients = self._table.recipients(key, topic)
        if not recipients:
            await settle.pass_on()
            return
        done = self._progress.pop(ident, None) if delivery > 1 else None
        if done:
            recipients = [h for h in recipients if id(h) not in done]
        failures: list[str] = []
        succeeded: list[int] = []
        counters, task = self._counters, asyncio.current_task()  # looked up once, not per call
        for handler in recipients:
            call = invoke(handler, topic, event, counters, task)
            error = await (call if around is None else around(call))
            if error is None:
                succeeded.append(id(handler))
            else:
                failures.append(f"{type(error).__name__}: {error}")
        if not failures:
            await settle.ack()
        elif policy.exhausted(delivery):
            await settle.dead_letter("; ".join(failures), delivery)
        else:
            if succeeded or done:
                self._remember(ident, (done or frozenset()).union(succeeded))
            await settle.retry(policy.backoff(delivery))

    def _remember(self, ident: Hashable, done: frozenset[int]) -> None:
        progress = self._progress
        progress[ident] = done
        if len(progress) > self._limit:
            progress.popitem(last=False)
