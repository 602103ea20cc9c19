"""The in-process dedup window: claim once, release on failure, expire, stay bounded."""

from __future__ import annotations

import asyncio

from loom_ha.ha.dedup import MemoryDedup


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
