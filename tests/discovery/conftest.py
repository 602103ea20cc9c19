"""Fixtures shared by the discovery tests: registry factories on real servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from loom_ha.discovery import ServiceInstance
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.testing.servers import ConsulAgent


@pytest.fixture
def service() -> str:
    """A service name unique to the test."""
    return f"svc-{uuid.uuid4().hex[:10]}"


def consul_url(agent: ConsulAgent) -> str:
    """The `consul://` URL of a launched agent."""
    return f"consul://{agent.address}"


def instance(service: str, n: int = 0, **fields: object) -> ServiceInstance:
    """Instance `n` of `service` with a Redis transport URL."""
    return ServiceInstance(
        service=service,
        instance_id=f"inst-{n}",
        address=f"redis://127.0.0.1:{6300 + n}",
        meta={"version": "0.1.0", "transport": "redis"},
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
async def consul_registry(consul_agent: ConsulAgent) -> AsyncIterator[ConsulRegistry]:
    """A ConsulRegistry on the session's dev agent (1.5 s TTL), closed after the test."""
    registry = ConsulRegistry(consul_url(consul_agent), ttl=1.5, watch_wait=2.0, timeout=2.0)
    try:
        yield registry
    finally:
        await registry.close()
