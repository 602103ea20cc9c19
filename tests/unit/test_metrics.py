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


async def test_request_routing_figures_are_exported() -> None:
    """A BalancedTransport's routing counters appear beside the transport's own."""
    from loom_ha.discovery import MemoryRegistry, ServiceInstance
    from loom_ha.routing import BalancedTransport

    registry = CollectorRegistry()
    members = MemoryRegistry()
    transport = BalancedTransport(InMemoryTransport(), members, instance_id="caller")
    metrics = TransportMetrics({"api": transport})
    registry.register(metrics)
    async with transport:
        # An instance that never answers: the request is routed, then waits in flight.
        await members.register(
            ServiceInstance(
                service="echo", instance_id="far", meta={"topic": "node.request/node/echo"}
            )
        )
        await transport.publish("node.request/node/echo", CloudEvent.create(source="/s", type="t"))
        await transport.publish("node.request/node/other", CloudEvent.create(source="/s", type="t"))
        text = generate_latest(registry).decode()
    assert 'loom_ha_requests_routed_total{transport="api"} 1.0' in text
    assert 'loom_ha_requests_unrouted_total{transport="api"} 1.0' in text
    assert 'loom_ha_requests_in_flight{transport="api"} 1.0' in text
