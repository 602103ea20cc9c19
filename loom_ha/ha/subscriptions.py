"""What `HATransport` was asked to subscribe, and what its current inner transport holds.

The two differ while the broker is away: a subscribe or unsubscribe made then is only
recorded, and `SubscriptionBook.reconcile()` applies the difference once the inner transport
is back (before the outbox replays), whether it reconnected by itself or was replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loom_ha._handlers import Handler
from loom_ha.transport import Transport

__all__ = ["Subscription", "SubscriptionBook"]


@dataclass(frozen=True)
class Subscription:
    """One subscribe() call's arguments: what is restored after every reconnect."""

    topic: str
    handler: Handler
    group: str | None


class SubscriptionBook:
    """Wanted subscriptions (kept across reconnects) and the live ones, with the handler
    (dedup wrapper) each was subscribed with on the inner transport."""

    def __init__(self) -> None:
        # Dicts, not lists: a Loom client subscribes and unsubscribes a reply handler per call
        # target, so every operation here is O(1) in the number of subscriptions.
        self.wanted: dict[Subscription, None] = {}
        self._live: dict[Subscription, Handler] = {}
        self._of_topic: dict[tuple[str, Handler], list[Subscription]] = {}  # wanted, per pair
        self._holding: dict[Handler, int] = {}  # wanted or live subscriptions per handler

    def want(self, sub: Subscription) -> bool:
        """Record `sub`; False when it was already wanted."""
        if sub in self.wanted:
            return False
        self.wanted[sub] = None
        self._of_topic.setdefault((sub.topic, sub.handler), []).append(sub)
        self._hold(sub.handler, +1)
        return True

    def unwant(self, topic: str, handler: Handler) -> list[Subscription]:
        """Stop wanting every subscription of `handler` to `topic`; returns them."""
        gone = self._of_topic.pop((topic, handler), [])
        for sub in gone:
            del self.wanted[sub]
            self._hold(handler, -1)
        return gone

    def is_live(self, sub: Subscription) -> bool:
        """True while `sub` is held by the inner transport."""
        return sub in self._live

    def holds(self, handler: Handler) -> bool:
        """True while `handler` is wanted or still live anywhere."""
        return handler in self._holding

    def _hold(self, handler: Handler, change: int) -> None:
        count = self._holding.get(handler, 0) + change
        if count:
            self._holding[handler] = count
        else:
            del self._holding[handler]

    async def attach(self, inner: Transport, sub: Subscription, wrapper: Handler) -> None:
        """Subscribe `sub` on `inner` through `wrapper`."""
        await inner.subscribe(sub.topic, wrapper, group=sub.group)
        if sub not in self._live:
            self._hold(sub.handler, +1)
        self._live[sub] = wrapper

    async def detach(self, inner: Transport, sub: Subscription) -> None:
        """Unsubscribe `sub` from `inner` (kept as live if that raises: retried later)."""
        wrapper = self._live.get(sub)
        if wrapper is not None:
            await inner.unsubscribe(sub.topic, wrapper)
            if self._live.pop(sub, None) is not None:
                self._hold(sub.handler, -1)

    async def reconcile(
        self, inner: Transport, wrap: Callable[[Subscription], Handler]
    ) -> list[Handler]:
        """Make `inner` hold exactly the wanted subscriptions; returns the handlers detached.

        Detaching goes first: an unsubscribe removes every group of a (topic, handler) pair.
        """
        detached = [s for s in self._live if s not in self.wanted]
        for sub in detached:
            await self.detach(inner, sub)
        for sub in [s for s in self.wanted if s not in self._live]:
            await self.attach(inner, sub, wrap(sub))
        return [s.handler for s in detached]

    def inner_replaced(self) -> None:
        """A new inner transport holds nothing yet."""
        for sub in self._live:
            self._hold(sub.handler, -1)
        self._live.clear()

    def clear(self) -> None:
        """Forget everything (the transport shut down)."""
        self.wanted.clear()
        self._live.clear()
        self._of_topic.clear()
        self._holding.clear()
