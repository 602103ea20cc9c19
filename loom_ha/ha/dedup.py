"""Dedup windows: a handler sees an event once, even after a replay or a redelivery.

The key is the CloudEvent idempotency key, ``source`` + ``id``. An event is
*claimed* before its handler runs and *released* if the handler fails, so a
redelivery of a failed event is handled again while a copy of a handled one is
dropped. `MemoryDedup` serves one process; `RedisDedup` shares the window
between every instance of a service.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Protocol

from loom_ha.errors import ConfigurationError


def idempotency_key(event: Any) -> str:
    """CloudEvents' idempotency key: source and id together."""
    return f"{event.source}\x1f{event.id}"


class DedupWindow(Protocol):
    """Remembers which events were handled, for `ttl` seconds."""

    async def claim(self, key: str) -> bool:
        """True the first time `key` is seen in the window (the caller handles it)."""
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
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def claim(self, key: str) -> bool:
        return self.claim_nowait(key)

    def claim_nowait(self, key: str) -> bool:
        """`claim` without a coroutine: the in-process window never waits (hot path)."""
        now = time.monotonic()
        seen = self._seen
        if seen and next(iter(seen.values())) <= now:
            self._expire(now)
        if key in seen:
            return False
        seen[key] = now + self.ttl
        if len(seen) > self.max_entries:
            seen.popitem(last=False)
        return True

    async def release(self, key: str) -> None:
        self._seen.pop(key, None)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, deadline = next(iter(seen.items()))
            if deadline > now:
                return
            del seen[key]

    async def close(self) -> None:
        self._seen.clear()


class RedisDedup:
    """A window shared through Redis: ``SET key NX PX ttl`` claims, ``DEL`` releases."""

    def __init__(self, url: str, *, ttl: float = 600.0, prefix: str = "loom:dedup:") -> None:
        if ttl <= 0:
            raise ConfigurationError(f"dedup ttl must be > 0, got {ttl}")
        try:
            from redis.asyncio import Redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("RedisDedup needs: pip install 'loom-ha[redis]'") from exc
        self.ttl = ttl
        self.prefix = prefix
        self._redis = Redis.from_url(url)

    async def claim(self, key: str) -> bool:
        claimed = await self._redis.set(self.prefix + key, b"1", nx=True, px=int(self.ttl * 1000))
        return bool(claimed)

    async def release(self, key: str) -> None:
        await self._redis.delete(self.prefix + key)

    async def close(self) -> None:
        await self._redis.aclose()
