"""Helpers of the partition tests: a paced publisher that may run in another member's thread,
a handler that counts every arrival, polling, and the one report line each test prints.

The publisher's records are plain lists and a `threading.Event`, so it can run inside a member
namespace (`Member.run`, its own event loop) while the test's loop reads them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loom_ha.errors import TransportError
from loom_ha.event import CloudEvent
from loom_ha.testing.collect import delivery_report
from loom_ha.transport import Transport

PACE = 0.005
"""Seconds between two publishes (~200 events/s): enough events in every phase of a
scenario, few enough that a 2-core machine keeps up with three brokers running."""


@dataclass
class Pacer:
    """Publishes numbered events every `PACE` s until `stop` is set; times every call."""

    name: str
    sent: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    longest: float = 0.0
    """The longest single publish call (stall), seconds."""
    calls: list[tuple[float, float]] = field(default_factory=list)
    """(began, seconds) of every publish call: tells a stall at the cut from one at the heal."""
    stop: threading.Event = field(default_factory=threading.Event)
    moves: list[tuple[float, str | None]] = field(default_factory=list)
    """(when, endpoint) each time the publishing transport was seen on another server."""

    async def run(self, transport: Transport, topic: str) -> None:
        """Publish until `stop` is set (a TransportError is recorded, not raised)."""
        n = 0
        while not self.stop.is_set():
            event = CloudEvent.create(source=f"/partition/{self.name}", type="p", data={"n": n})
            n += 1
            started = time.monotonic()
            try:
                await transport.publish(topic, event)
            except TransportError as exc:  # every publish either arrives or raises
                self.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                self.sent.append(event.id)
                self.accepted_at.append(time.monotonic())
            self.calls.append((started, time.monotonic() - started))
            self.longest = max(self.longest, self.calls[-1][1])
            endpoint = transport.statistics().endpoint
            if not self.moves or self.moves[-1][1] != endpoint:
                self.moves.append((time.monotonic(), endpoint))
            await asyncio.sleep(PACE)

    def moved_to(self, endpoint: str, after: float) -> float | None:
        """When the transport was first seen on `endpoint` after `after`, else None."""
        return next((t for t, e in self.moves if t > after and e == endpoint), None)

    def longest_within(self, start: float, end: float = float("inf")) -> float:
        """The longest publish call that began and returned between `start` and `end`, s."""
        return max((t for b, t in self.calls if start <= b and b + t <= end), default=0.0)

    def longest_running_after(self, start: float) -> float:
        """The longest publish call still running at or after `start`, seconds."""
        return max((t for b, t in self.calls if b + t >= start), default=0.0)

    def accepted_between(self, start: float, end: float = float("inf")) -> list[str]:
        """Ids whose publish returned between `start` and `end` (monotonic seconds)."""
        pairs = zip(self.sent, self.accepted_at, strict=False)
        return [i for i, t in pairs if start <= t < end]


class Counter:
    """A handler that records every call (duplicates show) with the time of first arrival."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.first: dict[str, float] = {}

    async def __call__(self, event: Any) -> None:
        self.calls.append(event.id)
        self.first.setdefault(event.id, time.monotonic())


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
