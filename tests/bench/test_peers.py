"""FastStream peer rows run end to end on real servers (structure only: figures go to docs)."""

from __future__ import annotations

import asyncio
import re
import sys

import pytest

from loom_ha.bench.core import BenchRow
from loom_ha.bench.peers import peer_rows
from loom_ha.errors import ConfigurationError
from loom_ha.testing.servers import NatsServer, RedisServer, wait_until

CLOSE_TIMEOUT = 10.0  # s: the server notices a closed client on its next read, not at once


def _check(rows: list[BenchRow], broker: str) -> None:
    assert [r.unit for r in rows] == ["events/s", "ms", "ms"], rows
    assert "throughput" in rows[0].name and "p50" in rows[1].name and "p99" in rows[2].name
    for row in rows:
        assert broker in row.name and "FastStream" in row.baseline_name, row
        assert row.ours > 0 and row.baseline is not None and row.baseline > 0, row
        assert row.spread is not None and row.spread[0] <= row.ratio <= row.spread[1], row  # type: ignore[operator]
    assert rows[0].higher_is_better and not rows[1].higher_is_better
    assert rows[0].cpu is not None and min(rows[0].cpu) > 0, rows[0]  # CPU µs/event, both sides


def _no_tasks_left() -> None:
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not left, left


def _nats_clients(server: NatsServer) -> int:
    count = server.monitor("connz")["num_connections"]
    assert isinstance(count, int), count
    return count


def _redis_clients(server: RedisServer) -> int:
    reply = server.command("CLIENT", "LIST")
    assert isinstance(reply, bytes), reply
    return len(reply.splitlines())


@pytest.mark.nats
async def test_nats_peer_rows(nats_server: NatsServer) -> None:
    """NATS core throughput and request/reply p50/p99 come beside FastStream's, and neither
    side leaves a connection or a task behind."""
    before = _nats_clients(nats_server)
    rows = await peer_rows("nats", nats_server.url, 200, 20, 2)
    _check(rows, "nats core")
    _no_tasks_left()
    wait_until(
        lambda: _nats_clients(nats_server) == before,
        timeout=CLOSE_TIMEOUT,
        what="NATS clients back to the count before the rows",
    )


@pytest.mark.redis
async def test_redis_peer_rows(redis_server: RedisServer) -> None:
    """Redis Pub/Sub throughput and request/reply p50/p99 come beside FastStream's, and
    neither side leaves a connection or a task behind."""
    before = _redis_clients(redis_server)
    rows = await peer_rows("redis", redis_server.url, 200, 20, 2)
    _check(rows, "redis pubsub")
    _no_tasks_left()
    wait_until(
        lambda: _redis_clients(redis_server) == before,
        timeout=CLOSE_TIMEOUT,
        what="Redis clients back to the count before the rows",
    )


async def test_missing_bench_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without FastStream the rows fail at once with the pip command that installs it."""
    monkeypatch.setitem(sys.modules, "faststream.nats", None)
    with pytest.raises(ImportError, match=r"pip install 'loom-ha\[bench\]'"):
        await peer_rows("nats", "nats://127.0.0.1:1", 1, 1, 1)


@pytest.mark.parametrize(
    ("transport", "url", "culprit"),
    [
        ("kafka", "nats://127.0.0.1:1", "'kafka'"),
        ("nats", "redis://127.0.0.1:1", "redis://"),
        ("redis", "redis+sentinel://127.0.0.1:1/m", "redis+sentinel://"),
        ("redis", "redis://127.0.0.1:1?mode=streams", "without options"),
    ],
)
async def test_bad_input_is_named(transport: str, url: str, culprit: str) -> None:
    """A wrong transport or a URL that is not a plain address of it fails before connecting."""
    with pytest.raises(ConfigurationError, match=re.escape(culprit)):
        await peer_rows(transport, url, 1, 1, 1)
