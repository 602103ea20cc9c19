"""TaskSupervisor: the owner of every background task loom-ha starts.

Each task is named, strongly referenced until it ends, and its crash is logged.
`aclose()` cancels and awaits every task, and finishes even when the caller is
itself being cancelled (the cancellation is re-raised afterwards).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("loom_ha.tasks")

# Shutdown is bounded: a task still running RECANCEL_INTERVAL s after its cancel is
# cancelled again (code that caught one cancellation meets the next), and one still running
# after SHUTDOWN_GRACE s is logged and left behind rather than hanging close() forever.
RECANCEL_INTERVAL = 1.0
SHUTDOWN_GRACE = 10.0


class TaskSupervisor:
    """Spawns named background tasks and cancels + awaits them on `aclose()`."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Start `coro` as a task owned by this supervisor.

        Raises:
            RuntimeError: the supervisor was closed (the coroutine is closed too).
        """
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._owner}: cannot spawn {name!r} after close")
        task = asyncio.create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    @property
    def closed(self) -> bool:
        """True after `aclose()` until `reopen()`: `spawn` would raise."""
        return self._closed

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s crashed", task.get_name(), exc_info=exc)

    @property
    def running(self) -> int:
        """How many tasks are still running."""
        return len(self._tasks)

    def reopen(self) -> None:
        """Allow spawning again after `aclose()` (a transport that reconnects)."""
        self._closed = False

    async def cancel(self, task: asyncio.Task[Any]) -> None:
        """Cancel one task and wait until it has finished."""
        await _cancel_and_wait({task})

    async def aclose(self) -> None:
        """Cancel every task and wait for all of them; idempotent."""
        self._closed = True
        await _cancel_and_wait(set(self._tasks))


async def _cancel_and_wait(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them, even if our own caller is cancelled meanwhile."""
    current = asyncio.current_task()
    if current is not None:
        tasks.discard(current)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    cancelled_while_waiting = False
    pending = tasks
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHUTDOWN_GRACE
    while pending:
        try:
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL)
        except asyncio.CancelledError:
            # Keep waiting (without interrupting their cleanup): leaving tasks
            # behind is worse than honouring our own cancellation a little late.
            cancelled_while_waiting = True
            continue
        if pending and loop.time() >= deadline:
            log.error(
                "tasks %s ignored cancellation for %.0f s; left behind so shutdown can finish",
                sorted(t.get_name() for t in pending),
                SHUTDOWN_GRACE,
            )
            break
        for task in pending:  # code that caught the first cancellation gets another
            task.cancel()
    if cancelled_while_waiting:
        raise asyncio.CancelledError


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set, for at most `timeout` seconds; True when it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def honouring_cancel(awaitable: Awaitable[T]) -> T:
    """Await `awaitable`; raise `CancelledError` if this task was cancelled meanwhile.

    Some callees swallow a cancellation that lands as they finish and return normally
    (redis-py 8.1's asyncio client; Python 3.11's `asyncio.wait_for`, bpo-42130): the
    cancelled task would go on. It still counts the request in `cancelling()`.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await awaitable
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result


async def finish_all(*steps: Callable[[], Awaitable[object]], owner: str = "loom_ha") -> None:
    """Run every clean-up step to its end, in order, even if the caller is cancelled meanwhile.

    The one "finish despite cancel" of loom-ha: a half-closed client leaks a socket, so a
    cancellation that arrives during clean-up is held until every step is done, then
    re-raised. A step that fails is logged and the next one still runs.
    """
    cancelled = False
    for step in steps:
        running = asyncio.ensure_future(step())
        while not running.done():
            try:
                await asyncio.wait({running})
            except asyncio.CancelledError:
                cancelled = True  # keep waiting: the step must not be left half done
        if not running.cancelled() and running.exception() is not None:
            log.warning("%s: clean-up step %r failed", owner, step, exc_info=running.exception())
    if cancelled:
        raise asyncio.CancelledError
