"""Measuring primitives shared by every backend's benchmark rows.

Throughput is events published back to back (or pipelined, through
`publish_many`) until the subscriber received the last one; latency is a ping on
one topic answered by a handler on another. Both work on any object with Loom's
transport methods, so a raw-client adapter can be measured by the very same code
as loom-ha's transports. `compare` runs loom-ha and its baseline in alternating
rounds, so a slow spell of a shared machine falls on both sides alike.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRow:
    """One measured figure for loom-ha and, when there is one, its baseline."""

    name: str
    unit: str
    ours: float
    baseline: float | None
    baseline_name: str
    higher_is_better: bool = True
    spread: tuple[float, float] | None = None  # lowest and highest ratio of the rounds

    @property
    def ratio(self) -> float | None:
        """ours / baseline (for times: baseline / ours), so > 1 means loom-ha is better."""
        if not self.baseline or not self.ours:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


Figures = tuple[float, ...]
Measure = Callable[[], Awaitable[Figures]]
# `compared_row` options for the figures of `latency_of`.
LATENCY_P50: dict[str, Any] = {"figure": 0, "higher_is_better": False}
LATENCY_P99: dict[str, Any] = {"figure": 1, "higher_is_better": False}


async def compare(
    ours: Measure,
    baseline: Measure,
    rounds: int,
) -> list[tuple[Figures, Figures]]:
    """Measure both sides `rounds` times, alternating which goes first; per round (ours, base)."""
    results = []
    for n in range(rounds):
        if n % 2:
            base_figures = await baseline()
            our_figures = await ours()
        else:
            our_figures = await ours()
            base_figures = await baseline()
        results.append((our_figures, base_figures))
    return results


def compared_row(
    name: str,
    unit: str,
    results: Sequence[tuple[Figures, Figures]],
    baseline_name: str,
    *,
    figure: int = 0,
    higher_is_better: bool = True,
) -> BenchRow:
    """A row of the medians of one figure over the rounds, with the range of per-round ratios."""
    ours = [o[figure] for o, _ in results]
    base = [b[figure] for _, b in results]
    ratios = [(o / b if higher_is_better else b / o) for o, b in zip(ours, base, strict=True)]
    return BenchRow(
        name,
        unit,
        statistics.median(ours),
        statistics.median(base),
        baseline_name,
        higher_is_better,
        (min(ratios), max(ratios)),
    )


async def measure_throughput(
    make_transport: Callable[[], Any],
    make_event: Callable[[int], Any],
    events: int,
    *,
    pipelined: bool = False,
) -> float:
    """Events/s from the first publish until the subscriber received the last event.

    With `pipelined` the events go through one `publish_many` call instead of one
    `publish` each.
    """
    transport = make_transport()
    await transport.connect()
    received = 0
    done = asyncio.Event()

    async def count(event: Any) -> None:
        nonlocal received
        received += 1
        if received >= events:
            done.set()

    try:
        await transport.subscribe("bench.throughput/x", count)
        batch = [make_event(i) for i in range(events)]
        started = time.perf_counter()
        if pipelined:
            await transport.publish_many(("bench.throughput/x", event) for event in batch)
        else:
            for event in batch:
                await transport.publish("bench.throughput/x", event)
        async with asyncio.timeout(120):
            await done.wait()
        return events / (time.perf_counter() - started)
    finally:
        await transport.disconnect()


async def measure_latency(
    make_transport: Callable[[], Any],
    make_event: Callable[[int], Any],
    pings: int,
    *,
    fresh_reply: bool = False,
) -> tuple[float, float]:
    """p50 and p99 round-trip time in ms of a ping answered by a handler.

    With `fresh_reply` the handler answers with a new event instead of echoing the
    ping (JetStream drops a re-published event id inside its duplicate window).
    """
    transport = make_transport()
    await transport.connect()
    pong: asyncio.Future[None] | None = None

    async def reply(event: Any) -> None:
        await transport.publish("bench.pong/x", make_event(-1) if fresh_reply else event)

    async def got_pong(event: Any) -> None:
        if pong is not None and not pong.done():
            pong.set_result(None)

    samples: list[float] = []
    try:
        await transport.subscribe("bench.ping/x", reply)
        await transport.subscribe("bench.pong/x", got_pong)
        loop = asyncio.get_running_loop()
        for i in range(pings):
            pong = loop.create_future()
            started = time.perf_counter()
            await transport.publish("bench.ping/x", make_event(i))
            async with asyncio.timeout(10):
                await pong
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await transport.disconnect()
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def throughput_of(
    make_transport: Callable[[], Any],
    make_event: Callable[[int], Any],
    events: int,
    *,
    pipelined: bool = False,
) -> Measure:
    """`measure_throughput` as a `compare` side: figures are (events/s,)."""

    async def measure() -> Figures:
        return (await measure_throughput(make_transport, make_event, events, pipelined=pipelined),)

    return measure


def latency_of(
    make_transport: Callable[[], Any],
    make_event: Callable[[int], Any],
    pings: int,
    *,
    fresh_reply: bool = False,
) -> Measure:
    """`measure_latency` as a `compare` side: figures are (p50 ms, p99 ms)."""

    async def measure() -> Figures:
        return await measure_latency(make_transport, make_event, pings, fresh_reply=fresh_reply)

    return measure
