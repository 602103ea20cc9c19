"""Aggregate throughput: N processes, each a publisher and a consumer, against one broker.

``loom-ha bench --transport redis|nats|all --processes N`` starts N worker processes per
run (``python -m loom_ha.bench.aggregate URL LOOP EVENTS TOPIC``). Each builds the default
path (`create_transport(url)`: HATransport, dedup on), subscribes to a topic of its own,
says ``ready`` and waits; once every worker is ready the parent says ``go`` to all (the
barrier) and each publishes its events with one `publish_many` (pipelined) and counts them
back. The parent sums what was delivered over the wall time from the first worker's start
to the last worker's last delivery (one ``CLOCK_MONOTONIC``, shared by the processes of a
Linux machine), and sums the workers' CPU: client CPU per event, events per client core,
and, when the bench started the broker, the broker's CPU per event.

Every worker is owned by the run that started it: killed and awaited when the run fails or
is cancelled (Ctrl-C); a worker whose stdin closes before ``go`` (its parent died) stops by
itself, and one that got ``go`` ends once its events stop arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from loom_ha._loop import LOOP_ENV, choose_loop
from loom_ha.bench.core import Figures, Measure, compare
from loom_ha.bench.ha import default_path, with_options
from loom_ha.bench.memory import loom_event_factory
from loom_ha.bench.worker import Child, commands, cpu_seconds, emit, wait_for

__all__ = ["AggregateRow", "aggregate_rows", "main", "render_aggregate", "run_aggregate"]

MODES = {"redis": ("streams", "pubsub"), "nats": ("core", "jetstream")}
MODE_NAMES = {
    "streams": "Redis Streams",
    "pubsub": "Redis Pub/Sub",
    "core": "NATS core",
    "jetstream": "JetStream",
}
GROUP = {"streams": "bench"}  # Streams is measured as users run it: a consumer group that acks
COLUMNS = (  # the figure columns' headers, one word (or unit) a line
    "procs|delivered|aggregate\nevents/s|per process\nevents/s|client CPU\nµs/event|"
    "per client\ncore\nevents/s|broker CPU\nµs/event"
)
TOPIC_PREFIX = "bench.aggregate/"
IDLE = 5.0  # s without a delivery after which a worker reports what it got (at-most-once loss)
READY_TIMEOUT = 120.0  # s for N workers to start, connect and subscribe on a loaded machine
RUN_TIMEOUT = 600.0  # s for the events of one run to flow
EXIT_TIMEOUT = 30.0  # s for a worker to disconnect and exit after its report


# -- worker side -------------------------------------------------------------------------------


async def _worker(url: str, events: int, topic: str) -> None:
    """Subscribe, say ready, wait for go, publish `events` pipelined and count them back."""
    from loom_ha.event import loom_event_class

    inbox = await commands()
    make_event = loom_event_factory()
    transport = default_path(url, event_class=loom_event_class()).default()
    received, last = 0, 0.0
    done = asyncio.Event()

    async def count(event: Any) -> None:
        nonlocal received, last
        received += 1
        last = time.monotonic()
        if received >= events:
            done.set()

    await transport.connect()
    try:
        await transport.subscribe(topic, count, group=GROUP.get(_mode_of(url)))
        batch = [(topic, make_event(i)) for i in range(events)]
        emit("ready")
        if not await wait_for(inbox, "go"):
            return
        cpu_started, started = time.process_time(), time.monotonic()
        await transport.publish_many(batch)
        seen = -1
        while not done.is_set() and received != seen:  # stop once deliveries stall
            seen = received
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE):
                    await done.wait()
        cpu = time.process_time() - cpu_started
        end = last or started  # nothing delivered: an empty window
        emit("report", sent=events, delivered=received, start=started, end=end, cpu=cpu)
    finally:
        await transport.disconnect()


def _mode_of(url: str) -> str:
    return url.rpartition("mode=")[2].partition("&")[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker: ``URL LOOP EVENTS TOPIC`` (LOOP: asyncio or uvloop)."""
    url, loop, events, topic = sys.argv[1:] if argv is None else argv
    choose_loop(loop).run(_worker(url, int(events), topic))
    return 0


# -- parent side -------------------------------------------------------------------------------


class _Workers:
    """The worker processes of one run; `stop()` kills and awaits whichever still runs."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    async def start(self, url: str, loop: str, events: int, topics: Sequence[str]) -> None:
        for topic in topics:
            child = await Child.start("loom_ha.bench.aggregate", url, loop, str(events), topic)
            self.children.append(child)

    async def expect_all(self, event: str, timeout: float) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):  # one deadline for all: the slowest decides
            return [await child.expect(event) for child in self.children]

    def send_all(self, command: str) -> None:
        for child in self.children:
            child.send(command)

    async def finish(self, timeout: float) -> None:
        """Let the workers disconnect and exit; raise if one failed doing so."""
        with contextlib.suppress(TimeoutError):  # `stop()` kills the ones still there
            async with asyncio.timeout(timeout):
                codes = await asyncio.gather(*(c.proc.wait() for c in self.children))
                if any(codes):
                    raise RuntimeError(f"aggregate worker exit codes {codes}: see stderr")

    async def stop(self) -> None:
        await asyncio.gather(*(child.kill() for child in self.children))


async def measure_run(
    url: str, loop: str, processes: int, events: int, broker_pid: int | None = None
) -> Figures:
    """One run of `processes` workers on `url` (its ``mode`` option picks the mode).

    Figures: (aggregate events/s, mean events/s per process, client CPU µs per event,
    events per client core-second, broker CPU µs per event or NaN, delivered, sent).
    """
    run = uuid.uuid4().hex[:8]
    topics = [f"{TOPIC_PREFIX}{run}-p{n}" for n in range(processes)]
    workers = _Workers()
    try:
        await workers.start(url, loop, events, topics)
        await workers.expect_all("ready", READY_TIMEOUT)
        broker_before = cpu_seconds(broker_pid)
        workers.send_all("go")
        reports = await workers.expect_all("report", RUN_TIMEOUT)
        broker_after = cpu_seconds(broker_pid)
        await workers.finish(EXIT_TIMEOUT)
    finally:
        await workers.stop()
    await _cleanup(url, topics)
    delivered = sum(r["delivered"] for r in reports)
    cpu = sum(r["cpu"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    rates = [r["delivered"] / (r["end"] - r["start"]) if r["delivered"] else 0.0 for r in reports]
    broker = math.nan
    if broker_before is not None and broker_after is not None and delivered:
        broker = (broker_after - broker_before) / delivered * 1e6
    return (
        delivered / wall if delivered and wall > 0 else 0.0,
        statistics.mean(rates),
        cpu / delivered * 1e6 if delivered else math.nan,
        delivered / cpu if cpu > 0 else math.nan,
        broker,
        float(delivered),
        float(sum(r["sent"] for r in reports)),
    )


async def _cleanup(url: str, topics: Sequence[str]) -> None:
    """Drop what the durable modes kept of a run (outside the timed window).

    Speaks to the broker with the plain client at the URL's address and the default key
    and stream layout; a failure is logged (the run's figures stand), naming what was left.
    """
    try:
        await _drop(url, topics)
    except Exception as exc:  # a leftover is reported; the figures stand
        logging.getLogger(__name__).warning(
            "aggregate bench: could not remove the events of topics %s from %s: %r",
            ", ".join(topics),
            url,
            exc,
        )


async def _drop(url: str, topics: Sequence[str]) -> None:
    mode = _mode_of(url)
    if mode == "streams":
        import redis.asyncio as aioredis

        from loom_ha.redis.streams import RedisStreamsTransport

        layout = RedisStreamsTransport()  # the default key layout create_transport uses
        keys = [layout.stream_key(topic) for topic in topics]
        client = aioredis.Redis.from_url(url.partition("?")[0])
        try:
            await client.delete(*keys)
            await client.srem(layout.registry_key, *keys)
        finally:
            await client.aclose()
    elif mode == "jetstream":
        import nats

        from loom_ha.nats import StreamOptions
        from loom_ha.nats.subjects import SubjectCodec

        subjects = SubjectCodec()
        nc = await nats.connect(url.partition("?")[0].split(","))
        try:
            for topic in topics:
                await nc.jetstream().purge_stream(
                    StreamOptions().name, subject=subjects.subject(topic)
                )
        finally:
            await nc.close()


@dataclass(frozen=True)
class AggregateRow:
    """Medians over the rounds of one mode on one event loop with N processes."""

    mode: str
    loop: str
    processes: int
    rate: float  # aggregate events/s
    spread: tuple[float, float]  # lowest and highest aggregate of the rounds
    per_process: float
    cpu_us: float  # client CPU µs per event, all workers
    per_core: float  # events per second of client CPU
    broker_us: float  # broker CPU µs per event (NaN: broker not started here)
    delivered: int  # per run: the lowest over the rounds
    sent: int  # per run


async def aggregate_rows(
    url: str,
    kind: str,
    *,
    processes: int,
    events: int,
    rounds: int,
    loops: Sequence[str],
    broker_pid: int | None = None,
) -> list[AggregateRow]:
    """Every mode of broker `kind` (redis, nats) on every loop, in alternating rounds."""
    sides = [(mode, loop) for mode in MODES[kind] for loop in loops]

    def side(mode: str, loop: str) -> Measure:
        async def measure() -> Figures:
            return await measure_run(
                with_options(url, mode=mode), loop, processes, events, broker_pid
            )

        return measure

    measures = [side(mode, loop) for mode, loop in sides]
    results = await compare(measures[0], measures[1], rounds, more=measures[2:])
    rows = []
    for n, (mode, loop) in enumerate(sides):
        runs = [r[n] for r in results]
        medians = [statistics.median(run[i] for run in runs) for i in range(5)]
        rate, per_process, cpu_us, per_core, broker_us = medians
        rates = [run[0] for run in runs]
        delivered, sent = int(min(run[5] for run in runs)), int(runs[0][6])
        rows.append(
            AggregateRow(
                mode, loop, processes, rate, (min(rates), max(rates)), per_process, cpu_us,
                per_core, broker_us, delivered, sent,
            )
        )  # fmt: skip
    return rows


def render_aggregate(console: Console, rows: Sequence[AggregateRow], title: str) -> None:
    """Print the rows as a table, with what each column means below it."""
    table = Table(title=title)
    table.add_column("mode", no_wrap=True)
    table.add_column("loop", no_wrap=True)
    for column in COLUMNS.split("|"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        low, high = round(row.spread[0]), round(row.spread[1])
        lost = "" if row.delivered == row.sent else f" of {row.sent:,}"
        table.add_row(
            MODE_NAMES[row.mode],
            row.loop,
            str(row.processes),
            f"{row.delivered:,}{lost}",
            f"{row.rate:,.0f}" + (f" ({low:,}-{high:,})" if low != high else ""),
            f"{row.per_process:,.0f}",
            f"{row.cpu_us:,.2f}",
            f"{row.per_core:,.0f}",
            "-" if math.isnan(row.broker_us) else f"{row.broker_us:,.2f}",
        )
    console.print(table)
    console.print(
        "aggregate: events delivered by all processes / wall time from the first start to "
        "the last delivery, median of the rounds (range); each process publishes its "
        "events with one publish_many and consumes them on its own topic, on the default "
        "path (create_transport: HATransport, dedup on); Streams consume in a group and "
        "ack, JetStream acks. client CPU: user+system time of "
        "all processes per delivered event; per client core: delivered events per "
        "CPU-second of the clients. broker CPU: the broker process's CPU per delivered "
        "event (only when the bench started it). delivered: lowest over the rounds (of sent)."
    )


def loops_to_run(flag: str | None) -> list[str]:
    """Both loops (uvloop when installed) unless one was asked for (flag or $LOOM_HA_LOOP)."""
    if flag is None and not os.environ.get(LOOP_ENV, "").strip():
        fast = choose_loop("auto").name
        return ["asyncio"] if fast == "asyncio" else ["asyncio", fast]
    return [choose_loop(flag).name]


async def run_aggregate(
    console: Console,
    *,
    transport: str,
    url: str | None,
    processes: int,
    events: int,
    rounds: int,
    loop: str | None,
) -> int:
    """`--processes N`: start the broker(s) unless `url` is given, measure, print."""
    kinds = {"redis": ["redis"], "nats": ["nats"], "all": ["redis", "nats"]}.get(transport)
    if kinds is None or (url is not None and len(kinds) > 1):
        console.print(
            f"[red]--processes measures brokers: --transport redis or nats (or all without "
            f"--url), not {transport}[/]"
        )
        return 2
    if processes < 1 or events < 1 or rounds < 1:
        console.print(
            f"[red]--processes, --events and --rounds must be >= 1 "
            f"(got {processes}, {events}, {rounds})[/]"
        )
        return 2
    loops = loops_to_run(loop)
    rows: list[AggregateRow] = []
    for kind in kinds:
        with contextlib.ExitStack() as servers:
            broker, pid = url, None
            if broker is None:
                from loom_ha.testing.nats_servers import NatsServer
                from loom_ha.testing.redis_servers import RedisServer

                started: RedisServer | NatsServer = (
                    RedisServer() if kind == "redis" else NatsServer(jetstream=True)
                )
                servers.enter_context(started)
                broker, pid = started.url, started.pid
            rows += await aggregate_rows(
                broker,
                kind,
                processes=processes,
                events=events,
                rounds=rounds,
                loops=loops,
                broker_pid=pid,
            )
    if "redis" in kinds:
        from redis.utils import HIREDIS_AVAILABLE

        console.print(f"redis-py parser: {'hiredis' if HIREDIS_AVAILABLE else 'pure Python'}")
    render_aggregate(
        console, rows, f"loom-ha bench --transport {transport} --processes {processes}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
