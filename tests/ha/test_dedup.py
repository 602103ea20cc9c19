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
    window = MemoryDedup(ttl=0.05)
    assert await window.claim("a")
    # asyncio.sleep never returns early, so the entry's deadline (claim + 0.05 s) has
    # passed however late this resumes: no upper bound is involved.
    await asyncio.sleep(0.06)
    assert await window.claim("a")  # expired

    # Size alone, with a ttl no stall can reach: an eviction cannot be taken for an expiry.
    window = MemoryDedup(ttl=600, max_entries=2)
    assert await window.claim("a")
    assert await window.claim("b")
    assert await window.claim("c")  # evicts "a", the oldest
    assert not await window.claim("c")
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


# A lease long enough that a scheduling stall cannot let a renewed claim lapse: renewals
# come every LEASE / 3, so the claim survives any stall shorter than 2/3 * LEASE = 2 s.
LEASE = 3.0


@pytest.mark.redis
async def test_redis_lease_is_renewed_while_running_and_lapses_when_the_owner_dies(
    redis_server: Any,
) -> None:
    """A running handler keeps its claim past the lease; a dead owner's claim lapses."""
    prefix = f"test:{uuid.uuid4().hex}:"
    owner = RedisDedup(redis_server.url, ttl=30, lease=LEASE, prefix=prefix)
    dying = RedisDedup(redis_server.url, ttl=30, lease=LEASE, prefix=prefix)
    other = RedisDedup(redis_server.url, ttl=30, lease=LEASE, prefix=prefix)
    try:
        assert await dying.claim("done")
        await dying.complete("done")
        assert await dying.claim("orphan")
        await dying.close()  # the owner "dies" mid-handler: no complete, no release
        assert await owner.claim("running")
        assert not await other.claim("orphan")  # its lease still runs
        # One wait longer than a lease covers all three: without renewals "running" would
        # have lapsed, and "orphan", whose renewals stopped when `dying` closed (before
        # this sleep), has. asyncio.sleep never returns early; the 0.5 s covers Redis
        # expiring by its own (millisecond) clock. Not a synchronisation: the time passing
        # is what is tested.
        await asyncio.sleep(LEASE + 0.5)
        assert not await other.claim("running")  # only the renewal kept it
        # Completed, then its owner died: kept for the ttl, though nobody renews it.
        assert not await other.claim("done")
        assert await other.claim("orphan")
    finally:
        await owner.close()
        await dying.close()
        await other.close()


def test_redis_window_rejects_a_lease_longer_than_the_ttl() -> None:
    """A bad lease fails at construction, naming both numbers."""
    with pytest.raises(ConfigurationError, match="lease"):
        RedisDedup("redis://127.0.0.1:1", ttl=1, lease=5)
