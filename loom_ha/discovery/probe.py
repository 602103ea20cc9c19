"""`HealthCheck` and `evaluate()`: how loom-ha asks "can this instance serve?", in one place.

Used by a registration's liveness probe (run with every heartbeat round) and by
`HealthGate` (polled to gate consumption). A check that raises, answers false or does not
answer in time is a verdict ("unhealthy, because ..."), never a crash of the caller.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeAlias

__all__ = ["HealthCheck", "evaluate"]

HealthCheck: TypeAlias = Callable[[], bool | Awaitable[bool]]
"""Returns True when the instance can serve (e.g. its database answers); may be async."""


async def evaluate(check: HealthCheck, timeout: float, *, what: str) -> tuple[bool, str]:
    """Run `check` once, bounded by `timeout` seconds: (healthy, why not).

    The reason names `what` ("liveness probe", "health check") and the failure: false,
    no answer within `timeout`, or the exception raised. Cancellation propagates.
    """
    try:
        async with asyncio.timeout(timeout):
            result = check()
            healthy = bool(await result) if inspect.isawaitable(result) else bool(result)
    except TimeoutError:
        return False, f"{what} took longer than {timeout:.3g}s"
    except Exception as exc:  # a failing check is a verdict, not a crash
        return False, f"{what} raised {exc!r}"
    return healthy, "" if healthy else f"{what} returned false"
