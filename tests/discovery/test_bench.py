"""The registry benchmarks run end to end and report sane numbers."""

from __future__ import annotations

import pytest

from loom_ha.bench.discovery import bench_registry
from loom_ha.bench.discovery_scale import scale_scenario
from loom_ha.testing.servers import ConsulAgent, RedisServer

from .conftest import consul_url


async def test_bench_reports_rates_and_latencies() -> None:
    """A small memory run yields positive rates and one latency per change."""
    result = await bench_registry("memory://", instances=5, samples=4)
    assert result.registrations_per_s > 0 and result.heartbeats_per_s > 0
    assert len(result.propagation_ms) == 4
    assert "watch propagation" in result.summary()


@pytest.mark.consul
async def test_bench_against_consul(consul_agent: ConsulAgent) -> None:
    """A small run against the dev agent completes and prints its figures."""
    result = await bench_registry(consul_url(consul_agent), instances=20, samples=6)
    print("\n" + result.summary())
    assert len(result.propagation_ms) == 6


@pytest.mark.consul
@pytest.mark.redis
async def test_scale_bench_small_run(consul_agent: ConsulAgent, redis_server: RedisServer) -> None:
    """Two registering processes and a watcher per registry: beats, no failure, changes seen."""
    for url in (consul_url(consul_agent), redis_server.url):
        result = await scale_scenario(
            url, processes=2, per_process=20, duration=2, ttl=1.5, watchers=1
        )
        print("\n" + "\n".join(result.lines()))
        assert result.failures == 0 and result.passing_at_end == 40
        # Two processes beating every 0.5 s for 4 s or so: a few requests, never one per
        # instance per round (that would be 40 a round).
        assert 2 <= sum(result.requests.values()) < 40
        assert result.changes >= 2
        assert len(result.propagation_ms) == result.changes  # each seen by the watcher
