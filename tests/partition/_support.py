"""Helpers of the partition tests: the publishing pace, polling, and the one report line each
test prints.

The publisher is `loom_ha.testing.pacer.Pacer`, at `PACE`: it runs inside a member namespace
(`Member.run`, a thread and event loop of its own) while the test's loop polls its records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loom_ha.testing.collect import delivery_report

PACE = 0.005
"""Seconds between two publishes (~200 events/s): enough events in every phase of a
scenario, few enough that a 2-core machine keeps up with three brokers running."""


async def eventually(
    condition: Callable[[], object], *, within: float, what: str | Callable[[], str]
) -> float:
    """Poll `condition` (records of another thread have no signal); return when it held.

    Raises:
        AssertionError: naming `what` (called, when it is a function, to describe the state
            at the timeout), when `within` seconds passed first.
    """
    try:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 - polling is the point
                await asyncio.sleep(0.02)
    except TimeoutError:
        described = what() if callable(what) else what
        raise AssertionError(f"{described}: not within {within}s") from None
    return time.monotonic()


async def eventually_async(
    condition: Callable[[], Awaitable[object]], *, within: float, what: str
) -> float:
    """`eventually` for a condition that asks a server."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110 - polling the server is the point
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {within}s") from None
    return time.monotonic()


def report(scenario: str, sent: list[str], calls: list[str], **figures: object) -> Any:
    """Print one line: sent / received / lost / duplicated, then `figures`; return the report."""
    result = delivery_report(sent, calls)
    extra = " ".join(
        f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(
        f"\n[partition] {scenario}: sent={result.sent} received={len(set(calls) & set(sent))} "
        f"lost={len(result.lost)} duplicated={len(result.duplicated)} {extra}"
    )
    return result
