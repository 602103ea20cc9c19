"""Measuring primitives shared by every backend's benchmark rows.

Throughput is events published back to back (or pipelined, through `publish_many`)
until the subscriber received the last one, with this process's CPU time over the same
window (publisher and subscriber run here, so it is the whole cost of an event); latency
is a ping on one topic answered by a handler on another. Both work on any object with
Loom's transport methods, so a raw-client adapter is measured by the very same code as
loom-ha's transports. `compare` runs every side once per round, rotating which goes
first, so a slow spell of a shared machine falls on all sides alike.

A loom-ha row measures a `Path`: its headline is the transport users get (what
`create_transport(url)` builds: HATransport with its dedup window, see
`loom_ha.bench.ha`), and the bare backend is measured in the same rounds as a breakdown.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    # Throughput rows: process CPU µs per event, medians of the rounds (ours, baseline) ...
    cpu: tuple[float, float] | None = None
    # ... and ours minus baseline per round: median, lowest, highest.
    cpu_added: tuple[float, float, float] | None = None

    @property
    def ratio(self) -> float | None:
        """ours / baseline (for times: baseline / ours), so > 1 means loom-ha is better."""
        if not self.baseline or not self.ours:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


Figures = tuple[float, ...]
Round = tuple[Figures, ...]  # one side's figures each: (ours, baseline, *more)
Measure = Callable[[], Awaitable[Figures]]
MakeTransport = Callable[[], Any]
# `compared_row` options for the figures of `throughput_of` and `latency_of`.
THROUGHPUT: dict[str, Any] = {"figure": 0, "cpu_figure": 1}
LATENCY_P50: dict[str, Any] = {"figure": 0, "higher_is_better": False}
LATENCY_P99: dict[str, Any] = {"figure": 1, "higher_is_better": False}
BARE = "(bare backend)"
"""Suffix of the breakdown rows: the backend without HATransport (``ha=false``)."""

THROUGHPUT_TOPIC = "bench.throughput/x"
PING_TOPIC = "bench.ping/x"
PONG_TOPIC = "bench.pong/x"


async def compare(
    ours: Measure,
    baseline: Measure,
    rounds: int,
    *,
    more: Sequence[Measure] = (),
) -> list[Round]:
    """Measure every side once per round; per round the figures of (ours, baseline, *more).

    Round n starts with side n mod k and takes the others in order, so every side goes
    first equally often (two sides simply alternate).
    """
    sides = (ours, baseline, *more)
    results: list[Round] = []
    for n in range(rounds):
        figures: dict[int, Figures] = {}
        for k in range(len(sides)):
            side = (n + k) % len(sides)
            figures[side] = await sides[side]()
        results.append(tuple(figures[side] for side in range(len(sides))))
    return results


def compared_row(
    name: str,
    unit: str,
    results: Sequence[Round],
    baseline_name: str,
    *,
    figure: int = 0,
    higher_is_better: bool = True,
    side: int = 0,
    cpu_figure: int | None = None,
) -> BenchRow:
    """A row of the medians of one figure over the rounds, with the range of per-round ratios.

    `side` picks the measured side set against the baseline (0: ours, 2: the first of
    `compare`'s `more`); `cpu_figure` adds that figure as CPU µs per event.
    """
    ours = [r[side][figure] for r in results]
    base = [r[1][figure] for r in results]
    ratios = [(o / b if higher_is_better else b / o) for o, b in zip(ours, base, strict=True)]
    cpu = cpu_added = None
    if cpu_figure is not None:
        ours_cpu = [r[side][cpu_figure] for r in results]
        base_cpu = [r[1][cpu_figure] for r in results]
        added = [o - b for o, b in zip(ours_cpu, base_cpu, strict=True)]
        cpu = (statistics.median(ours_cpu), statistics.median(base_cpu))
        cpu_added = (statistics.median(added), min(added), max(added))
    return BenchRow(
        name,
        unit,
        statistics.median(ours),
        statistics.median(base),
        baseline_name,
        higher_is_better,
        (min(ratios), max(ratios)),
        cpu,
        cpu_added,
    )


@dataclass(frozen=True)
class Path:
    """loom-ha's side of a row: the transport users get and, as a breakdown, its bare backend.

    `cleanup` runs after each measurement of either (outside the timed window): for
    brokers that keep what the bench sent, so every round starts alike.
    """

    default: MakeTransport
    bare: MakeTransport | None = None
    cleanup: Callable[[], Awaitable[None]] | None = None

    def measured(self, measure: Callable[[MakeTransport], Measure]) -> list[Measure]:
        """`measure` of the default path, then of the bare backend when there is one."""
        sides = [measure(make) for make in (self.default, self.bare) if make is not None]
        cleanup = self.cleanup
        if cleanup is None:
            return sides

        def then_clean(side: Measure) -> Measure:
            async def run() -> Figures:
                try:
                    return await side()
                finally:
                    await cleanup()

            return run

        return [then_clean(side) for side in sides]


async def path_rows(
    path: Path,
    measure: Callable[[MakeTransport], Measure],
    baseline: Measure,
    baseline_name: str,
    rounds: int,
    figures: Sequence[tuple[str, str, Mapping[str, Any]]],
) -> list[BenchRow]:
    """Rows of one measurement: the default path's, then the bare backend's (named `BARE`).

    All three sides (default path, baseline, bare backend) run in the same rounds; each
    of `figures` (name, unit, `compared_row` options) gives one row per loom-ha side.
    """
    ours, *more = path.measured(measure)
    results = await compare(ours, baseline, rounds, more=more)
    rows = [
        compared_row(name, unit, results, baseline_name, **opts) for name, unit, opts in figures
    ]
    if path.bare is not None:
        rows += [
            compared_row(f"{name} {BARE}", unit, results, baseline_name, side=2, **opts)
            for name, unit, opts in figures
        ]
    return rows


async def throughput_rows(
    name: str,
    path: Path,
    baseline: MakeTransport,
    baseline_name: str,
    *,
    make_event: Callable[[int], Any],
    events: int,
    rounds: int,
    pipelined: bool = False,
    group: str | None = None,
    baseline_event: Callable[[int], Any] | None = None,
) -> list[BenchRow]:
    """Throughput and CPU per event of `path` beside `baseline` (see `measure_throughput`).

    `group` is loom-ha's consumer group (the baseline's adapter joins its own);
    `baseline_event` makes the baseline's events when they differ (bare bytes).
    """

    def measure(make: MakeTransport) -> Measure:
        return throughput_of(make, make_event, events, pipelined=pipelined, group=group)

    base = throughput_of(baseline, baseline_event or make_event, events, pipelined=pipelined)
    return await path_rows(
        path, measure, base, baseline_name, rounds, [(name, "events/s", THROUGHPUT)]
    )


async def latency_rows(
    name: str,
    path: Path,
    baseline: MakeTransport,
    baseline_name: str,
    *,
    make_event: Callable[[int], Any],
    pings: int,
    rounds: int,
    fresh_reply: bool = False,
) -> list[BenchRow]:
    """p50 and p99 round trips of `path` beside `baseline` (see `measure_latency`)."""

    def measure(make: MakeTransport) -> Measure:
        return latency_of(make, make_event, pings, fresh_reply=fresh_reply)

    figures = [(f"{name} p50", "ms", LATENCY_P50), (f"{name} p99", "ms", LATENCY_P99)]
    return await path_rows(path, measure, measure(baseline), baseline_name, rounds, figures)


async def measure_throughput(
    make_transport: MakeTransport,
    make_event: Callable[[int], Any],
    events: int,
    *,
    pipelined: bool = False,
    group: str | None = None,
) -> tuple[float, float]:
    """Events/s from the first publish until the subscriber received the last event, and
    this process's CPU time (user + system) per event in µs over the same window.

    With `pipelined` the events go through one `publish_many` call instead of one
    `publish` each; with `group` the subscriber joins that consumer group.
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
        if group is None:  # raw adapters take no group argument
            await transport.subscribe(THROUGHPUT_TOPIC, count)
        else:
            await transport.subscribe(THROUGHPUT_TOPIC, count, group=group)
        batch = [make_event(i) for i in range(events)]
        cpu_started = time.process_time()
        started = time.perf_counter()
        if pipelined:
            await transport.publish_many((THROUGHPUT_TOPIC, event) for event in batch)
        else:
            for event in batch:
                await transport.publish(THROUGHPUT_TOPIC, event)
        async with asyncio.timeout(120):
            await done.wait()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        return events / elapsed, cpu / events * 1e6
    finally:
        await transport.disconnect()


async def measure_latency(
    make_transport: MakeTransport,
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
        await transport.publish(PONG_TOPIC, make_event(-1) if fresh_reply else event)

    async def got_pong(event: Any) -> None:
        if pong is not None and not pong.done():
            pong.set_result(None)

    samples: list[float] = []
    try:
        await transport.subscribe(PING_TOPIC, reply)
        await transport.subscribe(PONG_TOPIC, got_pong)
        loop = asyncio.get_running_loop()
        for i in range(pings):
            pong = loop.create_future()
            started = time.perf_counter()
            await transport.publish(PING_TOPIC, make_event(i))
            async with asyncio.timeout(10):
                await pong
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await transport.disconnect()
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def throughput_of(
    make_transport: MakeTransport,
    make_event: Callable[[int], Any],
    events: int,
    *,
    pipelined: bool = False,
    group: str | None = None,
) -> Measure:
    """`measure_throughput` as a `compare` side: figures are (events/s, CPU µs/event)."""

    async def measure() -> Figures:
        return await measure_throughput(
            make_transport, make_event, events, pipelined=pipelined, group=group
        )

    return measure


def latency_of(
    make_transport: MakeTransport,
    make_event: Callable[[int], Any],
    pings: int,
    *,
    fresh_reply: bool = False,
) -> Measure:
    """`measure_latency` as a `compare` side: figures are (p50 ms, p99 ms)."""

    async def measure() -> Figures:
        return await measure_latency(make_transport, make_event, pings, fresh_reply=fresh_reply)

    return measure
