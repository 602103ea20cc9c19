"""The in-process dedup window: claim once, release on failure, expire, stay bounded."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
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


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["claim", "release", "wait"]),
            st.sampled_from("abcdef"),
            st.floats(min_value=0.0, max_value=3.0),
        ),
        max_size=60,
    ),
    max_entries=st.integers(min_value=1, max_value=4),
)
def test_memory_window_matches_a_plain_model(
    steps: list[tuple[str, str, float]], max_entries: int
) -> None:
    """Expiry and eviction agree with the obvious model (a list of (key, deadline) in claim
    order) whatever the interleaving: the hot path's cached oldest deadline is never late."""
    now = [100.0]
    with pytest.MonkeyPatch.context() as patch:  # a clock the test moves, per example
        patch.setattr(dedup_module.time, "monotonic", lambda: now[0])
        _replay(steps, max_entries, now)


def _replay(steps: list[tuple[str, str, float]], max_entries: int, now: list[float]) -> None:
    window = MemoryDedup(ttl=2.0, max_entries=max_entries)
    model: list[tuple[str, float]] = []
    for action, key, seconds in steps:
        if action == "wait":
            now[0] += seconds
        elif action == "release":
            asyncio.run(window.release(key))
            model = [(k, d) for k, d in model if k != key]
        else:
            model = [(k, d) for k, d in model if d > now[0]]
            fresh = all(k != key for k, _ in model)
            if fresh:
                model = [*model, (key, now[0] + 2.0)][-max_entries:]
            assert window.claim_nowait(key) is fresh, (action, key, now[0], model)


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
