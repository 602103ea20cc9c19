"""Dedup windows: claim once, release on failure, expire, shared across instances via Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from loom_ha.errors import ConfigurationError
from loom_ha.ha.dedup import MemoryDedup, RedisDedup


async def test_memory_window_claims_once_and_releases() -> None:
    """The first claim wins, a second is a duplicate, a release allows a new claim."""
    window = MemoryDedup()
    assert await window.claim("k")
    assert not await window.claim("k")
    await window.release("k")
    assert await window.claim("k")


async def test_memory_window_is_bounded_in_time_and_size() -> None:
    """Entries expire after ttl, and the oldest go first when the window is full."""
    window = MemoryDedup(ttl=0.05, max_entries=2)
    assert await window.claim("a")
    await asyncio.sleep(0.06)
    assert await window.claim("a")  # expired
    await window.claim("b")
    await window.claim("c")  # evicts "a"
    assert await window.claim("a")


@pytest.mark.redis
async def test_redis_window_is_shared_between_instances(redis_server: Any) -> None:
    """Two processes' windows on one Redis agree: only one claims an event."""
    prefix = f"test:{uuid.uuid4().hex}:"
    first = RedisDedup(redis_server.url, ttl=5, prefix=prefix)
    second = RedisDedup(redis_server.url, ttl=5, prefix=prefix)
    try:
        assert await first.claim("k")
        assert not await second.claim("k")
        await first.release("k")
        assert await second.claim("k")
    finally:
        await first.close()
        await second.close()


@pytest.mark.redis
async def test_redis_lease_is_renewed_while_running_and_lapses_when_the_owner_dies(
    redis_server: Any,
) -> None:
    """A running handler keeps its claim past the lease; a dead owner's claim lapses."""
    prefix = f"test:{uuid.uuid4().hex}:"
    owner = RedisDedup(redis_server.url, ttl=30, lease=0.3, prefix=prefix)
    other = RedisDedup(redis_server.url, ttl=30, lease=0.3, prefix=prefix)
    try:
        assert await owner.claim("running")
        await asyncio.sleep(0.9)  # three leases: only the renewal keeps the claim alive
        assert not await other.claim("running")
        await owner.complete("running")
        await asyncio.sleep(0.5)  # completed: kept for the ttl, not the lease
        assert not await other.claim("running")

        assert await owner.claim("orphan")
        await owner.close()  # the owner "dies" mid-handler: no complete, no release
        await asyncio.sleep(0.5)
        assert await other.claim("orphan")
    finally:
        await owner.close()
        await other.close()


def test_redis_window_rejects_a_lease_longer_than_the_ttl() -> None:
    """A bad lease fails at construction, naming both numbers."""
    with pytest.raises(ConfigurationError, match="lease"):
        RedisDedup("redis://127.0.0.1:1", ttl=1, lease=5)
