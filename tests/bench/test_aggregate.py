"""`--processes N`: worker processes on real brokers, owned by the run (figures go to docs)."""

from __future__ import annotations

import asyncio
import io
import math
import os
from pathlib import Path
from typing import cast

import nats
import pytest
import redis.asyncio as aioredis
from rich.console import Console

from loom_ha.bench.aggregate import (
    MODE_NAMES,
    TOPIC_PREFIX,
    AggregateRow,
    aggregate_rows,
    measure_run,
    render_aggregate,
    run_aggregate,
)
from loom_ha.nats import StreamOptions
from loom_ha.nats.subjects import SubjectCodec
from loom_ha.redis.streams import RedisStreamsTransport
from loom_ha.testing.servers import NatsServer, RedisServer, free_port

LOOPS = ["asyncio", "uvloop"]


def _workers() -> list[int]:
    """This process's live aggregate workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # ended while we looked
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"bench.aggregate" in cmd:
            found.append(int(stat.parent.name))
    return found


def _check(rows: list[AggregateRow], modes: tuple[str, str], events: int) -> None:
    """One row per mode and loop, every event of both processes back, every figure set."""
    assert [(r.mode, r.loop) for r in rows] == [(m, loop) for m in modes for loop in LOOPS]
    for row in rows:
        assert row.processes == 2 and row.sent == row.delivered == 2 * events, row
        assert row.rate > 0 and row.spread[0] <= row.rate <= row.spread[1], row
        assert row.per_process > 0 and row.cpu_us > 0 and row.per_core > 0, row
        assert not math.isnan(row.broker_us) and row.broker_us >= 0, row
    assert _workers() == []


@pytest.mark.redis
@pytest.mark.timeout(120)  # 4 runs of 2 fresh worker processes each on a loaded 2-core machine
async def test_redis_aggregate_rows(redis_server: RedisServer) -> None:
    """Streams and Pub/Sub on both loops deliver everything; the streams are removed after."""
    rows = await aggregate_rows(
        redis_server.url,
        "redis",
        processes=2,
        events=100,
        rounds=1,
        loops=LOOPS,
        broker_pid=redis_server.pid,
    )
    _check(rows, ("streams", "pubsub"), 100)
    layout = RedisStreamsTransport()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        prefix = layout.stream_key(TOPIC_PREFIX)
        assert await client.keys(prefix + b"*") == []
        registered = cast("set[bytes]", await client.smembers(layout.registry_key))
        assert [key for key in registered if key.startswith(prefix)] == []
    finally:
        await client.aclose()


@pytest.mark.nats
@pytest.mark.timeout(120)  # 4 runs of 2 fresh worker processes each on a loaded 2-core machine
async def test_nats_aggregate_rows(nats_server: NatsServer) -> None:
    """Core and JetStream on both loops deliver everything; the stream keeps none of it."""
    rows = await aggregate_rows(
        nats_server.url,
        "nats",
        processes=2,
        events=100,
        rounds=1,
        loops=LOOPS,
        broker_pid=nats_server.pid,
    )
    _check(rows, ("core", "jetstream"), 100)
    nc = await nats.connect(nats_server.url)
    try:
        prefix = SubjectCodec().subject(f"{TOPIC_PREFIX}x").rsplit(".", 1)[0]
        info = await nc.jetstream().stream_info(StreamOptions().name, f"{prefix}.>")
        assert not info.state.subjects
    finally:
        await nc.close()


async def test_cancelled_run_kills_its_workers() -> None:
    """Cancelling a run (Ctrl-C) while its workers still wait for a broker leaves none."""
    url = f"redis://127.0.0.1:{free_port()}/0?mode=streams"  # nobody listens: they keep trying
    run = asyncio.ensure_future(measure_run(url, "asyncio", 2, 10))
    try:
        async with asyncio.timeout(60):
            while len(_workers()) < 2:  # noqa: ASYNC110 - /proc offers no event
                await asyncio.sleep(0.05)
    finally:
        run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert _workers() == []


async def test_failing_worker_fails_the_run_and_stops_the_others() -> None:
    """A worker that cannot start (bad URL option) fails the run; no worker is left."""
    url = f"redis://127.0.0.1:{free_port()}/0?mode=streams&no_such_option=1"
    with pytest.raises(RuntimeError, match="worker exited"):
        await measure_run(url, "asyncio", 2, 10)
    assert _workers() == []


@pytest.mark.parametrize(
    ("transport", "processes", "url", "culprit"),
    [
        ("memory", 2, None, "not memory"),
        ("all", 2, "redis://127.0.0.1:1", "not all"),
        ("redis", 0, None, "got 0,"),
    ],
)
async def test_bad_arguments_are_named(
    transport: str, processes: int, url: str | None, culprit: str
) -> None:
    """A transport that is not a broker, or a count below 1, exits 2 naming it."""
    out = io.StringIO()
    code = await run_aggregate(
        Console(file=out, width=200),
        transport=transport,
        url=url,
        processes=processes,
        events=10,
        rounds=1,
        loop=None,
    )
    assert code == 2 and culprit in out.getvalue()


def test_render_names_every_mode() -> None:
    """The table shows each mode's name, loop and figures; a broker not started here is '-'."""
    rows = [
        AggregateRow(mode, "uvloop", 2, 1000.0, (900.0, 1100.0), 600.0, 20.0, 50_000.0, nan, 9, 9)
        for mode, nan in zip(MODE_NAMES, (math.nan, 1.5, 1.5, 1.5), strict=True)
    ]
    out = io.StringIO()
    render_aggregate(Console(file=out, width=250), rows, "title")
    text = out.getvalue()
    assert all(name in text for name in MODE_NAMES.values())
    assert "1,000 (900-1,100)" in text and "50,000" in text and "1.50" in text
    first = next(line for line in text.splitlines() if "Redis Streams" in line)
    assert first.rstrip(" │").endswith("-")
