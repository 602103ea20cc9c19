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
from collections.abc import Callable
from types import CoroutineType
from typing import Any, Protocol

from loom_ha.errors import ConfigurationError
from loom_ha.event import idempotency_key

__all__ = ["DedupHandler", "DedupWindow", "DedupWrappers", "MemoryDedup", "idempotency_key"]


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
    """An in-process window, bounded in time (`ttl`) and in size (`max_entries`).

    Two generations of keys: claims go to the current one; it becomes the previous one
    when it holds `max_entries // 2` keys or is `ttl` old, and the previous one is
    dropped then. So a key is remembered for at least `ttl` seconds or the next
    `max_entries // 2` claims, whichever ends first, and forgotten within `2 * ttl`;
    the window never holds more than `max_entries` keys. Rotating a generation costs
    nothing per claim, where evicting the oldest entry of an ordered dict cost a cache
    miss on every claim of a full window.

    A key is kept as its 64-bit hash (a third of the memory of the string): two keys
    with the same hash would pass for one event, with odds of one in 2**64 per key held,
    about one genuine event in 10**14 claims against a full default window.
    """

    def __init__(self, *, ttl: float = 600.0, max_entries: int = 100_000) -> None:
        if ttl <= 0 or max_entries < 2:
            raise ConfigurationError(
                f"dedup ttl must be > 0 and max_entries >= 2, got {ttl}, {max_entries}"
            )
        self.ttl = ttl
        self.max_entries = max_entries
        self._capacity = max_entries // 2
        self._current: set[int] = set()
        self._previous: set[int] = set()
        self._rotate_at = time.monotonic() + ttl

    async def claim(self, key: str) -> bool:
        return self.claim_nowait(key)

    def claim_nowait(self, key: str) -> bool:
        """`claim` without a coroutine: the in-process window never waits (hot path)."""
        now = time.monotonic()
        if now >= self._rotate_at:
            self._expire(now)
        digest = hash(key)
        current = self._current
        if digest in current or digest in self._previous:
            return False
        current.add(digest)
        if len(current) >= self._capacity:
            self._shift(now + self.ttl)
        return True

    async def complete(self, key: str) -> None:
        """Nothing to do: a claim lives as long as its process, which ran the handler."""

    async def release(self, key: str) -> None:
        digest = hash(key)
        self._current.discard(digest)
        self._previous.discard(digest)

    @property
    def size(self) -> int:
        """How many keys the window holds (at most `max_entries`)."""
        return len(self._current) + len(self._previous)

    def _expire(self, now: float) -> None:
        """The current generation is `ttl` old: it becomes the previous one, on the same
        time grid (a late claim must not stretch it), or both go when even the grid's next
        step has passed (everything held is older than `ttl`)."""
        if now >= self._rotate_at + self.ttl:
            self._previous, self._current = set(), set()
            self._rotate_at = now + self.ttl
        else:
            self._shift(self._rotate_at + self.ttl)

    def _shift(self, rotate_at: float) -> None:
        self._previous, self._current = self._current, set()
        self._rotate_at = rotate_at

    async def close(self) -> None:
        self._current.clear()
        self._previous.clear()


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
