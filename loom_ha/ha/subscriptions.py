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
        self.wanted: list[Subscription] = []
        self._live: dict[Subscription, Handler] = {}

    def want(self, sub: Subscription) -> bool:
        """Record `sub`; False when it was already wanted."""
        if sub in self.wanted:
            return False
        self.wanted.append(sub)
        return True

    def unwant(self, topic: str, handler: Handler) -> list[Subscription]:
        """Stop wanting every subscription of `handler` to `topic`; returns them."""
        gone = [s for s in self.wanted if s.topic == topic and s.handler == handler]
        self.wanted = [s for s in self.wanted if s not in gone]
        return gone

    def is_live(self, sub: Subscription) -> bool:
        """True while `sub` is held by the inner transport."""
        return sub in self._live

    def holds(self, handler: Handler) -> bool:
        """True while `handler` is wanted or still live anywhere."""
        return any(s.handler == handler for s in (*self.wanted, *self._live))

    async def attach(self, inner: Transport, sub: Subscription, wrapper: Handler) -> None:
        """Subscribe `sub` on `inner` through `wrapper`."""
        await inner.subscribe(sub.topic, wrapper, group=sub.group)
        self._live[sub] = wrapper

    async def detach(self, inner: Transport, sub: Subscription) -> None:
        """Unsubscribe `sub` from `inner` (kept as live if that raises: retried later)."""
        wrapper = self._live.get(sub)
        if wrapper is not None:
            await inner.unsubscribe(sub.topic, wrapper)
            self._live.pop(sub, None)

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
        self._live.clear()

    def clear(self) -> None:
        """Forget everything (the transport shut down)."""
        self.wanted.clear()
        self._live.clear()
