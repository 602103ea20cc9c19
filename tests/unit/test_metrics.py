"""Prometheus metrics mirror the transports' statistics at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from loom_ha.event import CloudEvent
from loom_ha.memory import InMemoryTransport
from loom_ha.metrics import TransportMetrics
from loom_ha.testing.collect import Collector


async def test_counters_and_state_are_exported() -> None:
    """Published/delivered counters and the one-hot state appear with the transport's name."""
    registry = CollectorRegistry()
    transport = InMemoryTransport()
    registry.register(TransportMetrics({"main": transport}))
    async with transport:
        got = Collector()
        await transport.subscribe("t", got)
        for _ in range(3):
            await transport.publish("t", CloudEvent.create(source="/s", type="t"))
        await got.wait_for(3)
        text = generate_latest(registry).decode()
    assert 'loom_ha_published_total{backend="memory",transport="main"} 3.0' in text
    assert 'loom_ha_delivered_total{backend="memory",transport="main"} 3.0' in text
    assert 'loom_ha_state{state="connected",transport="main"} 1.0' in text
    assert 'loom_ha_state{state="closed",transport="main"} 0.0' in text
