"""RetryPolicy: how loom-ha retries a broker operation; the only module importing tenacity.

Only `TransientError`s are retried (a lost connection, an election in progress).
`asyncio.CancelledError` is never retried and interrupts a backoff at once
(tenacity #529 shows how easily that goes wrong), so shutdown stays prompt.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from loom_ha.errors import ConfigurationError, FailoverExhaustedError, TransientError

T = TypeVar("T")


def backoff_delay(attempt: int, *, initial: float = 0.1, cap: float = 5.0) -> float:
    """Exponential backoff with "equal jitter": between half and all of min(cap, initial*2^n).

    For loops that pace themselves (watches, directory refreshes, routed re-attempts)
    rather than retry one call through `RetryPolicy`.
    """
    ceiling = min(cap, initial * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Sleep(Protocol):
    """An awaitable sleep (injectable so tests can observe backoffs)."""

    def __call__(self, seconds: float, /) -> Awaitable[None]: ...


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientError) and isinstance(exc, Exception)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures.

    Attributes:
        attempts: give up after this many attempts; ``None`` never gives up.
        timeout: give up after this many seconds; ``None``: no limit.
        wait_initial: first backoff, seconds.
        wait_max: largest backoff, seconds.
        wait_jitter: up to this many random seconds added to each backoff.
        sleep: the sleep function (tests inject their own).
    """

    attempts: int | None = None
    timeout: float | None = None
    wait_initial: float = 0.1
    wait_max: float = 5.0
    wait_jitter: float = 0.5
    sleep: Sleep = field(default=asyncio.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ConfigurationError(f"attempts must be >= 1 or None, got {self.attempts}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 or None, got {self.timeout}")
        if self.wait_initial < 0 or self.wait_max < self.wait_initial or self.wait_jitter < 0:
            raise ConfigurationError(
                "need 0 <= wait_initial <= wait_max and wait_jitter >= 0, got "
                f"{self.wait_initial}, {self.wait_max}, {self.wait_jitter}"
            )

    def _stop(self, spent: float = 0.0) -> stop_base:
        """Tenacity's stop condition, for a call that already spent `spent` seconds."""
        stops: list[stop_base] = []
        if self.attempts is not None:
            stops.append(stop_after_attempt(self.attempts))
        if self.timeout is not None:
            stops.append(stop_after_delay(max(0.0, self.timeout - spent)))
        return stop_any(*stops) if stops else stop_never

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Run `operation` until it succeeds, retrying `TransientError`s with backoff.

        Args:
            operation: called anew for each attempt.
            on_retry: told (attempt number, error, seconds until the next try).

        Raises:
            FailoverExhaustedError: attempts or timeout ran out; ``__cause__`` is the
                last error.
            Exception: any non-transient error, at once.
        """

        # The first attempt runs bare: setting up tenacity costs more than a broker
        # round trip on the hot path, and most calls succeed at once.
        started = time.monotonic()
        try:
            return await operation()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            first_error: BaseException | None = exc

        async def attempt_again() -> T:
            nonlocal first_error
            if first_error is not None:  # tenacity's attempt 1 is the one that just failed
                error, first_error = first_error, None
                raise error
            return await operation()

        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                error = state.outcome.exception()
                delay = state.next_action.sleep if state.next_action else 0.0
                if error is not None:
                    on_retry(state.attempt_number, error, delay)

        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            stop=self._stop(spent=time.monotonic() - started),
            wait=wait_exponential(multiplier=self.wait_initial, max=self.wait_max)
            + wait_random(0, self.wait_jitter),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        attempt_number = 0
        try:
            async for attempt in retrying:
                attempt_number = attempt.retry_state.attempt_number
                with attempt:
                    return await attempt_again()
        except Exception as exc:
            if _is_transient(exc) and (self.attempts is not None or self.timeout is not None):
                raise FailoverExhaustedError(
                    f"gave up after {attempt_number} attempts: {exc}", attempts=attempt_number
                ) from exc
            raise
        raise AssertionError("unreachable: tenacity either returned or raised")


# -- the named policies: every loop in loom-ha that waits and tries again uses one of these --

RECOVERY = RetryPolicy()
"""HATransport's recovery: never gives up; 0.1 s growing to 5 s between attempts."""

BROKER_WAIT_INITIAL, BROKER_WAIT_JITTER = 0.05, 0.1
"""A broker operation's backoff starts short: a failover usually ends within seconds."""


def within(timeout: float, *, wait_max: float = 0.5) -> RetryPolicy:
    """Retry a broker operation (connect, publish, a command) for up to `timeout` seconds."""
    return RetryPolicy(
        timeout=timeout,
        wait_initial=BROKER_WAIT_INITIAL,
        wait_max=wait_max,
        wait_jitter=BROKER_WAIT_JITTER,
    )


def forever(*, wait_max: float = 1.0) -> RetryPolicy:
    """Retry until it works: a backend following its broker back (reconnect, re-pull)."""
    return RetryPolicy(
        wait_initial=BROKER_WAIT_INITIAL, wait_max=wait_max, wait_jitter=BROKER_WAIT_JITTER
    )


ONCE = RetryPolicy(attempts=1, wait_initial=0, wait_max=0, wait_jitter=0)
"""A single attempt, failures mapped like every other call (a health check's ping)."""

ROUTED_BUDGET = RetryPolicy(attempts=3, timeout=30.0)
"""A routed request: three attempts on chosen instances within 30 s."""
