"""The broker benchmarks run end to end on real servers (figures go to docs, not asserts)."""

from __future__ import annotations

import pytest

from loom_ha.bench.core import BenchRow, compare, compared_row
from loom_ha.bench.ha import ha_rows
from loom_ha.bench.memory import memory_rows
from loom_ha.bench.nats import nats_rows
from loom_ha.bench.redis import redis_rows
from loom_ha.testing.servers import NatsServer, RedisServer


def _complete(rows: list[BenchRow]) -> None:
    for row in rows:
        assert row.ours > 0 and row.baseline is not None and row.baseline > 0, row
        assert row.spread is not None and row.spread[0] <= row.ratio <= row.spread[1], row  # type: ignore[operator]


async def test_compare_alternates_sides_and_rows_take_medians() -> None:
    """Rounds alternate which side goes first; rows show medians and the ratio range."""
    order: list[str] = []

    def side(name: str, figures: list[float]) -> object:
        async def measure() -> tuple[float, ...]:
            order.append(name)
            return (figures[len([o for o in order if o == name]) - 1],)

        return measure

    results = await compare(side("ours", [1, 9, 3]), side("base", [2, 2, 4]), 3)  # type: ignore[arg-type]
    assert order == ["ours", "base", "base", "ours", "ours", "base"]
    row = compared_row("x", "u", results, "b")
    assert (row.ours, row.baseline) == (3, 2)
    assert row.spread == (0.5, 4.5)
    latency = compared_row("y", "ms", results, "b", higher_is_better=False)
    assert latency.ratio == 2 / 3 and latency.spread == (2 / 9, 2)


async def test_memory_rows() -> None:
    _complete(await memory_rows(500, 50, rounds=2))


@pytest.mark.redis
async def test_redis_rows(redis_server: RedisServer) -> None:
    rows = await redis_rows(redis_server.url, 500, 50, rounds=2)
    assert len(rows) == 6
    _complete(rows)


@pytest.mark.nats
@pytest.mark.timeout(180)
async def test_nats_rows(nats_server: NatsServer) -> None:
    rows = await nats_rows([nats_server.url], 500, 50, rounds=2)
    assert len(rows) == 9
    _complete(rows)


@pytest.mark.redis
async def test_ha_rows(redis_server: RedisServer) -> None:
    rows = await ha_rows(400, redis_url=redis_server.url, rounds=2)
    assert [r.name for r in rows] == [
        f"{name} throughput via HATransport" for name in ("memory", "redis pubsub", "redis streams")
    ]
    _complete(rows)
