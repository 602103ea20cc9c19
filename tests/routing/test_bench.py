"""The balancing benchmark runs end to end (its figures go to docs/benchmarks.md, not asserts)."""

from __future__ import annotations

import pytest

from loom_ha.bench.balancing import STRATEGY_NAMES, overhead_rows, scaling_rows, strategy_rows
from loom_ha.nats import NatsCoreTransport
from loom_ha.testing.servers import NatsServer, RedisServer


def test_every_strategy_is_measured() -> None:
    """One row per strategy, each a positive cost."""
    rows = strategy_rows(calls=500)
    names = [r.name.removeprefix("strategy ") for r in rows]
    assert names == [*STRATEGY_NAMES, "p2c + ejection (default)"]
    assert all(r.ours > 0 for r in rows)


@pytest.mark.nats
async def test_overhead_rows_compare_routed_with_direct(nats_server: NatsServer) -> None:
    """Routed and direct request/reply both complete; the rows carry both sides."""
    url = nats_server.url
    rows = await overhead_rows(lambda: NatsCoreTransport([url]), "nats", 200)
    assert [r.baseline is not None for r in rows] == [True, False, True]
    assert rows[0].ours > 0 and rows[2].ours > 0


@pytest.mark.nats
@pytest.mark.redis
@pytest.mark.timeout(90)
async def test_scaling_rows_spread_requests_over_instance_processes(
    nats_server: NatsServer, redis_server: RedisServer
) -> None:
    """1, 2 and 3 echo-service processes registered in Redis each answer the client."""
    rows = await scaling_rows(
        f"{nats_server.url}?mode=core", redis_server.url, calls=60, work_ms=1.0
    )
    assert len(rows) == 3 and all(r.ours > 0 for r in rows)
