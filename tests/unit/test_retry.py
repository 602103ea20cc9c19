"""RetryPolicy retries only transient errors, gives up when told, and never eats cancellation."""

from __future__ import annotations

import asyncio

import pytest

from loom_ha.errors import ConfigurationError, ConnectionLostError, FailoverExhaustedError
from loom_ha.retry import RetryPolicy


async def test_transient_errors_are_retried_until_success() -> None:
    """A ConnectionLostError is retried; the result of the first success is returned."""
    calls = 0
    retries: list[int] = []

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionLostError("broker away")
        return "ok"

    policy = RetryPolicy(wait_initial=0.001, wait_max=0.01, wait_jitter=0)
    assert await policy.call(flaky, on_retry=lambda n, e, d: retries.append(n)) == "ok"
    assert calls == 3
    assert retries == [1, 2]


async def test_other_errors_are_raised_at_once() -> None:
    """A non-transient error is not retried."""
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bug")

    with pytest.raises(ValueError):
        await RetryPolicy(wait_initial=0.001, wait_jitter=0).call(broken)
    assert calls == 1


async def test_gives_up_after_attempts_with_the_cause() -> None:
    """With attempts set, FailoverExhaustedError carries the count and the last error."""

    async def down() -> None:
        raise ConnectionLostError("still down")

    policy = RetryPolicy(attempts=3, wait_initial=0.001, wait_max=0.001, wait_jitter=0)
    with pytest.raises(FailoverExhaustedError) as info:
        await policy.call(down)
    assert info.value.attempts == 3
    assert isinstance(info.value.__cause__, ConnectionLostError)


async def test_a_single_attempt_is_made_once() -> None:
    """attempts=1: the one failed attempt (run outside tenacity) is not repeated."""
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionLostError("down")

    with pytest.raises(FailoverExhaustedError) as info:
        await RetryPolicy(attempts=1, wait_initial=0, wait_max=0, wait_jitter=0).call(down)
    assert (calls, info.value.attempts) == (1, 1)


async def test_the_timeout_counts_the_first_attempt() -> None:
    """A first attempt that outlasts `timeout` is not followed by another one."""
    calls = 0

    async def slow_failure() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)  # never returns early: always outlasts the 0.2 s timeout
        raise ConnectionLostError("down")

    policy = RetryPolicy(timeout=0.2, wait_initial=0, wait_max=0, wait_jitter=0)
    with pytest.raises(FailoverExhaustedError):
        await policy.call(slow_failure)
    assert calls == 1


async def test_cancellation_interrupts_a_backoff_promptly() -> None:
    """Cancelling during a long backoff ends the call then, not when the backoff is over."""
    in_backoff = asyncio.Event()

    async def sleep(seconds: float) -> None:
        in_backoff.set()
        await asyncio.sleep(seconds)

    async def down() -> None:
        raise ConnectionLostError("down")

    policy = RetryPolicy(wait_initial=30, wait_max=30, wait_jitter=0, sleep=sleep)
    task = asyncio.create_task(policy.call(down))
    try:
        await in_backoff.wait()  # the call is now waiting out its 30 s backoff
        task.cancel()
        # Bound: the backoff. A cancellation that did not interrupt it would end the call
        # after 30 s at the earliest (or never, were it swallowed and the call retried):
        # ending within half of that proves the interruption, on any machine load.
        done, _ = await asyncio.wait({task}, timeout=15)
        assert done == {task}, "the cancellation did not interrupt the 30 s backoff"
        assert task.cancelled()
    finally:
        task.cancel()  # a no-op when it ended; when not, it must not outlive the test
        await asyncio.wait({task}, timeout=1)


def test_bad_options_fail_at_construction() -> None:
    """Nonsense settings are rejected with the option named."""
    with pytest.raises(ConfigurationError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigurationError, match="wait_initial"):
        RetryPolicy(wait_initial=10, wait_max=1)
