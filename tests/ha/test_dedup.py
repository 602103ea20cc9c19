"""The in-process dedup window: claim once, release on failure, expire, stay bounded."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loom_ha.event import CloudEvent, idempotency_key
from loom_ha.ha import dedup as dedup_module
from loom_ha.ha.dedup import DedupWrappers, MemoryDedup


async def test_memory_window_claims_once_and_releases() -> None:
    """The first claim wins, a second is a duplicate, a release allows a new claim."""
    window = MemoryDedup()
    assert await window.claim("k")
    assert not await window.claim("k")
    await window.release("k")
    assert await window.claim("k")


async def test_memory_window_is_bounded_in_time_and_size() -> None:
    """Entries expire within two ttl, and a full window forgets its older generation."""
    window = MemoryDedup(ttl=0.05)
    assert await window.claim("a")
    # asyncio.sleep never returns early, so two ttl (0.1 s) have passed since the claim
    # however late this resumes: no upper bound is involved.
    await asyncio.sleep(0.11)
    assert await window.claim("a")  # expired

    # Size alone, with a ttl no stall can reach: an eviction cannot be taken for an expiry.
    window = MemoryDedup(ttl=600, max_entries=4)  # generations of 2 keys
    for key in "abcd":
        assert await window.claim(key)
    assert not await window.claim("c")  # "a" and "b" went with their generation
    assert window.size == 2
    assert await window.claim("a")
    assert window.size <= 4


@settings(max_examples=400, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["claim", "claim", "release", "wait"]),
            st.sampled_from("abcdefgh"),
            st.floats(min_value=0.0, max_value=3.0),
        ),
        max_size=80,
    ),
    max_entries=st.integers(min_value=2, max_value=8),
)
@example(
    steps=[
        ("claim", "a", 0.0),
        ("wait", "a", 3.0),
        ("claim", "a", 0.0),
        ("wait", "a", 1.0),
        ("claim", "a", 0.0),
    ],
    max_entries=2,
)  # a late rotation
@example(
    steps=[("claim", "a", 0.0), ("wait", "a", 3.0), ("wait", "a", 1.5), ("claim", "a", 0.0)],
    max_entries=2,
)  # idle past two generations
def test_memory_window_keeps_its_promises(
    steps: list[tuple[str, str, float]], max_entries: int
) -> None:
    """Whatever the interleaving, the window keeps what it documents: a key claimed less
    than `ttl` ago, with fewer than `max_entries // 2` fresh claims since, is a duplicate; one
    never claimed, released, or claimed `2 * ttl` ago or more is fresh; it never holds
    more than `max_entries` keys."""
    now = [100.0]
    with pytest.MonkeyPatch.context() as patch:  # a clock the test moves, per example
        patch.setattr(dedup_module.time, "monotonic", lambda: now[0])
        _replay(steps, max_entries, now)


def _replay(steps: list[tuple[str, str, float]], max_entries: int, now: list[float]) -> None:
    ttl, capacity = 2.0, max_entries // 2
    # The clock is a sum of floats, and so are the window's deadlines: within a rounding
    # error of a bound, either answer is right.
    tie = 1e-9
    window = MemoryDedup(ttl=ttl, max_entries=max_entries)
    claimed: dict[str, tuple[float, int]] = {}  # key -> (claim time, fresh claims up to it)
    fresh_claims = 0
    for action, key, seconds in steps:
        if action == "wait":
            now[0] += seconds
        elif action == "release":
            asyncio.run(window.release(key))
            claimed.pop(key, None)
        else:
            fresh = window.claim_nowait(key)
            if key not in claimed:
                assert fresh, ("never claimed or released", key)
            else:
                at, index = claimed[key]
                since = fresh_claims - index  # fresh claims of other keys after it
                if now[0] - at < ttl - tie and since < capacity:
                    assert not fresh, ("must remember", key, now[0] - at)
                if now[0] - at >= 2 * ttl + tie:
                    assert fresh, ("must have forgotten", key, now[0] - at)
            if fresh:
                fresh_claims += 1
                claimed[key] = (now[0], fresh_claims)
        assert window.size <= max_entries


async def test_a_fan_out_handler_window_goes_with_its_last_subscription() -> None:
    """Each fan-out handler dedups in a window of its own that is dropped when the handler
    is forgotten: Loom's per-call reply handlers leave no entries behind."""
    wrappers = DedupWrappers(True)
    seen: list[str] = []

    async def first(event: CloudEvent) -> None:
        seen.append(f"first {event.id}")

    async def second(event: CloudEvent) -> None:
        seen.append(f"second {event.id}")

    event = CloudEvent.create(source="/test", type="t")
    wrapped = [wrappers.wrap(h, "t/x", None) for h in (first, second)]
    for wrapper in wrapped * 2:  # each handler once, then a copy of the same event to each
        await wrapper(event)
    assert seen == [f"first {event.id}", f"second {event.id}"]
    assert wrappers.duplicates_dropped == 2

    window = wrapped[0].window  # type: ignore[attr-defined]
    assert window is not wrapped[1].window  # type: ignore[attr-defined]
    await wrappers.forget(first)
    assert await window.claim(idempotency_key(event))  # emptied: nothing kept for it
    assert wrappers.wrapper_of(first) is None
    assert wrappers.wrap(first, "t/x", None) is not wrapped[0]  # subscribed again: a new one
