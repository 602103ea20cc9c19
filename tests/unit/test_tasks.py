"""TaskSupervisor: shutdown finishes even when a task catches its cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from loom_ha import _tasks
from loom_ha._handlers import DeliveryCounters, invoke
from loom_ha._tasks import TaskSupervisor, finish_all


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Code that catches the first cancel and waits again meets a second one."""
    monkeypatch.setattr(_tasks, "RECANCEL_INTERVAL", 0.05)
    caught = 0

    async def stubborn_once() -> None:
        nonlocal caught
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            caught += 1
        await asyncio.sleep(3600)  # the second cancel ends it

    supervisor = TaskSupervisor("test")
    task = supervisor.spawn(stubborn_once(), name="stubborn")
    await asyncio.sleep(0)
    async with asyncio.timeout(10):  # a hang is the failure
        await supervisor.aclose()
    assert task.cancelled() and caught == 1


async def test_shutdown_is_bounded_for_a_task_that_never_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A task ignoring every cancellation is logged and left, not waited for forever."""
    monkeypatch.setattr(_tasks, "RECANCEL_INTERVAL", 0.05)
    monkeypatch.setattr(_tasks, "SHUTDOWN_GRACE", 0.2)
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    supervisor = TaskSupervisor("test")
    task = supervisor.spawn(immortal(), name="immortal")
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await supervisor.aclose()
    assert not task.done() and "ignored cancellation" in caplog.text
    release.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_invoke_re_raises_a_cancellation_the_handler_swallowed() -> None:
    """The delivery task stays cancellable although its handler returned normally."""
    inside = asyncio.Event()

    async def swallowing(event: object) -> None:
        inside.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)

    counters = DeliveryCounters()
    task = asyncio.ensure_future(invoke(swallowing, "t", object(), counters))
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counters.delivered == 0


async def test_finish_all_runs_every_step_despite_a_cancel_and_a_failure() -> None:
    """Clean-up is never left half done: a cancel waits for every step, then is raised."""
    done: list[str] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> None:
        inside.set()
        await release.wait()
        done.append("slow")

    async def broken() -> None:
        raise RuntimeError("step failed (expected by the test)")

    async def last() -> None:
        done.append("last")

    task = asyncio.ensure_future(finish_all(slow, broken, last, owner="test"))
    await inside.wait()
    task.cancel()  # arrives mid-step: held until the end
    await asyncio.sleep(0)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["slow", "last"]
