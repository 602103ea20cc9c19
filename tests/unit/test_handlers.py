"""Delivery rules shared by all backends: owner keys, groups, isolation, task ownership."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loom_ha._handlers import DeliveryCounters, HandlerTable, invoke
from loom_ha._tasks import TaskSupervisor


def h1(event: Any) -> None:
    """A fan-out handler."""


def h2(event: Any) -> None:
    """Another handler."""


def test_overlapping_fanout_patterns_have_one_owner() -> None:
    """Of a handler's matching fan-out keys, exactly one delivers a given topic."""
    table = HandlerTable()
    keys = [table.add(p, h1, None)[0] for p in ("*", "a/*", "a/b")]
    deliveries = [k for k in keys if h1 in table.recipients(k, "a/b")]
    assert len(deliveries) == 1
    assert [k for k in keys if h1 in table.recipients(k, "a/c")] == [keys[0]]


def test_group_members_take_turns() -> None:
    """Handlers sharing a (pattern, group) key get events in round robin."""
    table = HandlerTable()
    key, new = table.add("jobs", h1, "g")
    assert new
    _, new = table.add("jobs", h2, "g")
    assert not new
    picks = [table.recipients(key, "jobs")[0] for _ in range(4)]
    assert picks == [h1, h2, h1, h2]


def test_remove_reports_emptied_keys_and_ignores_unknowns() -> None:
    """Removing the last handler of a key reports the key; unknown removals do nothing."""
    table = HandlerTable()
    key, _ = table.add("t", h1, None)
    table.add("t", h2, None)
    assert table.remove("t", h1) == []
    assert table.remove("t", h1) == []
    assert table.remove("t", h2) == [key]
    assert table.keys() == []
    assert not table.has_handler(h2)


async def test_invoke_isolates_errors_and_awaits_only_awaitables() -> None:
    """invoke() returns a failure (for the dead letter) instead of raising, and calls sync
    handlers without awaiting."""
    counters = DeliveryCounters()

    def broken(event: Any) -> None:
        raise ValueError("boom")

    error = await invoke(broken, "t", object(), counters)
    assert isinstance(error, ValueError) and str(error) == "boom"
    assert await invoke(h1, "t", object(), counters) is None
    assert (counters.handler_errors, counters.delivered) == (1, 1)


async def test_invoke_propagates_cancellation() -> None:
    """Cancelling a handler's delivery is never swallowed."""

    async def slow(event: Any) -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(invoke(slow, "t", object(), DeliveryCounters()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_supervisor_cancels_and_awaits_everything() -> None:
    """aclose() leaves no task running, even when the closer is cancelled meanwhile."""
    supervisor = TaskSupervisor("test")
    cleaning, stubborn_done = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaning.set()
            await asyncio.sleep(0.05)  # slow cleanup
            stubborn_done.set()

    supervisor.spawn(stubborn(), name="stubborn")
    supervisor.spawn(asyncio.sleep(10), name="sleeper")
    await asyncio.sleep(0)
    closer = asyncio.create_task(supervisor.aclose())
    await cleaning.wait()  # aclose() cancelled it and waits for its cleanup: cancel that wait
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert stubborn_done.is_set()
    assert supervisor.running == 0
    with pytest.raises(RuntimeError):
        supervisor.spawn(asyncio.sleep(0), name="late")


async def test_a_mailbox_worker_starts_with_its_first_event() -> None:
    """Subscribing starts no task: a backend that calls handlers in its own task (Redis
    Streams, JetStream) would otherwise keep an idle worker per handler. The first event
    starts the worker; order is kept; disconnecting stops it."""
    from loom_ha._delivery import LocalDelivery

    local = LocalDelivery("test", None)
    got: list[int] = []

    async def handler(event: Any) -> None:
        got.append(event)

    key, _ = local.add("a/b", handler, None)
    assert local.tasks.running == 0
    for n in range(3):
        local.deliver(key, "a/b", n)
    assert local.tasks.running == 1
    async with asyncio.timeout(5):
        while len(got) < 3:  # noqa: ASYNC110 - the worker has no completion signal
            await asyncio.sleep(0)
    assert got == [0, 1, 2]
    await local.close()
    assert local.tasks.running == 0
