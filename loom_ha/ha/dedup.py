"""Dedup windows: a handler sees an event once, even after a replay or a redelivery.

The key is the CloudEvent idempotency key, ``source`` + ``id`` (`idempotency_key`). An
event is *claimed* before its handler runs, *completed* when it succeeded (remembered for
`ttl`) and *released* if it failed, so a redelivery of a failed event is handled again
while a copy of a handled one is dropped. `MemoryDedup` serves one process; the windows
shared between every instance of a service sit with their broker and follow its
failovers: `loom_ha.redis.RedisDedup` and `loom_ha.nats.NatsDedup`. They hold a claim
only for a short, renewed *lease* while the handler runs: if the instance dies
mid-handler, the lease lapses and a redelivery (or a retry on another instance) is
handled instead of being dropped forever.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from collections.abc import Callable
from types import CoroutineType
from typing import Any, Protocol

from loom_ha.errors import ConfigurationError
from loom_ha.event import idempotency_key

__all__ = ["DedupHandler", "DedupWindow", "DedupWrappers", "MemoryDedup", "idempotency_key"]

_NEVER = float("inf")


class DedupWindow(Protocol):
    """Remembers which events were handled, for `ttl` seconds."""

    async def claim(self, key: str) -> bool:
        """True the first time `key` is seen in the window (the caller handles it)."""
        ...

    async def complete(self, key: str) -> None:
        """The handler of `key` succeeded: remember it for the whole window."""
        ...

    async def release(self, key: str) -> None:
        """Forget `key` (its handler failed, so a redelivery must be handled)."""
        ...

    async def close(self) -> None:
        """Release resources (connections)."""
        ...


class MemoryDedup:
    """An in-process window bounded by time (`ttl`) and size (`max_entries`)."""

    def __init__(self, *, ttl: float = 600.0, max_entries: int = 100_000) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ConfigurationError(
                f"dedup ttl must be > 0 and max_entries >= 1, got {ttl}, {max_entries}"
            )
        self.ttl = ttl
        self.max_entries = max_entries
        # Ordered by deadline (one ttl for all), so the first key is the oldest. `_oldest` is
        # at or before the first key's deadline (early is safe: `_expire` recomputes it), so
        # the hot path compares two floats instead of looking at the first entry.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._oldest = _NEVER

    async def claim(self, key: str) -> bool:
        return self.claim_nowait(key)

    def claim_nowait(self, key: str) -> bool:
        """`claim` without a coroutine: the in-process window never waits (hot path)."""
        now = time.monotonic()
        if now >= self._oldest:
            self._expire(now)
        seen = self._seen
        if key in seen:
            return False
        deadline = now + self.ttl
        if not seen:
            self._oldest = deadline
        seen[key] = deadline
        if len(seen) > self.max_entries:
            seen.popitem(last=False)  # the oldest; `_oldest` stays early, which is safe
        return True

    async def complete(self, key: str) -> None:
        """Nothing to do: a claim lives as long as its process, which ran the handler."""

    async def release(self, key: str) -> None:
        self._seen.pop(key, None)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, deadline = next(iter(seen.items()))
            if deadline > now:
                self._oldest = deadline
                return
            del seen[key]
        self._oldest = _NEVER

    async def close(self) -> None:
        self._seen.clear()


class DedupHandler:
    """Runs a handler unless its window already saw the event; completes or releases the claim.

    Used by `HATransport` (every subscription) and `BalancedTransport` (served requests);
    keys are `scope` + the event's idempotency key (no scope: the window is this handler's
    own); `on_duplicate` counts a dropped copy for the owner's statistics.
    """

    def __init__(
        self,
        handler: Callable[[Any], Any],
        window: DedupWindow,
        scope: str | None,
        on_duplicate: Callable[[], None],
    ) -> None:
        self.handler, self.window = handler, window
        self._prefix = "" if scope is None else f"{scope}\x1f"
        self._on_duplicate = on_duplicate
        # The in-process window answers without awaiting: skip a coroutine per event.
        self._claim_nowait = window.claim_nowait if isinstance(window, MemoryDedup) else None

    async def __call__(self, event: Any) -> None:
        key = self._prefix + idempotency_key(event)
        claim_nowait = self._claim_nowait
        fresh = claim_nowait(key) if claim_nowait is not None else await self.window.claim(key)
        if not fresh:
            self._on_duplicate()
            return
        try:
            result = self.handler(event)
            # Most handlers are coroutine functions: skip isawaitable()'s ABC checks for them.
            if result is not None and (
                type(result) is CoroutineType or inspect.isawaitable(result)
            ):
                await result
        except BaseException:
            await self.window.release(key)
            raise
        if self._claim_nowait is None:
            await self.window.complete(key)

    def __repr__(self) -> str:
        return f"dedup({self.handler!r})"


class DedupWrappers:
    """The dedup side of one `HATransport`: its windows and one wrapper per handler.

    Competing deliveries (a group, given or by the backend's rule) share the configured
    window, across instances when it is a shared one. A fan-out handler gets an in-process
    window of its own (through a shared one, two processes' reply handlers would drop each
    other's replies), made like the configured window when that is a `MemoryDedup`, and
    dropped with the handler's last subscription: a short-lived handler (Loom's reply
    handler of one call) leaves nothing behind. One wrapper per handler keeps the inner
    transport's once-per-handler rule.
    """

    def __init__(self, window: DedupWindow | bool | None) -> None:
        self.shared: DedupWindow | None = MemoryDedup() if window is True else (window or None)
        self._template = self.shared if isinstance(self.shared, MemoryDedup) else MemoryDedup()
        self._wrappers: dict[Callable[[Any], Any], DedupHandler] = {}
        self.duplicates_dropped = 0

    @property
    def enabled(self) -> bool:
        """False when deduplication is off (handlers are passed through)."""
        return self.shared is not None

    def wrap(
        self, handler: Callable[[Any], Any], topic: str, group: str | None
    ) -> Callable[[Any], Any]:
        """The wrapper of `handler` (made on first use); `group` as the backend resolved it."""
        if self.shared is None:
            return handler
        wrapper = self._wrappers.get(handler)
        if wrapper is None:
            if group is not None:
                wrapper = DedupHandler(handler, self.shared, f"g:{group}:{topic}", self._dropped)
            else:
                own = MemoryDedup(ttl=self._template.ttl, max_entries=self._template.max_entries)
                wrapper = DedupHandler(handler, own, None, self._dropped)
            self._wrappers[handler] = wrapper
        return wrapper

    def wrapper_of(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any] | None:
        """The wrapper `handler` was subscribed with, if any."""
        return self._wrappers.get(handler)

    async def forget(self, handler: Callable[[Any], Any]) -> None:
        """`handler` has no subscription left: drop its wrapper and its own window."""
        wrapper = self._wrappers.pop(handler, None)
        if wrapper is not None and wrapper.window is not self.shared:
            await wrapper.window.close()

    async def close(self) -> None:
        """Drop every wrapper and close the windows."""
        own = [w.window for w in self._wrappers.values() if w.window is not self.shared]
        self._wrappers.clear()
        for window in own:
            await window.close()
        if self.shared is not None:
            await self.shared.close()

    def _dropped(self) -> None:
        self.duplicates_dropped += 1
