"""The registry benchmark runs end to end and reports sane numbers."""

from __future__ import annotations

import pytest

from loom_ha.bench.discovery import bench_registry
from loom_ha.testing.servers import ConsulAgent

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
