"""Runs the shipped registry conformance suite against the memory, Redis and Consul registries."""

from __future__ import annotations

from typing import Any

import pytest

from loom_ha.discovery import MemoryRegistry, MemoryStore, ServiceRegistry
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.discovery.redis import RedisRegistry
from loom_ha.testing.registry_conformance import RegistryBackend, RegistryConformance
from loom_ha.testing.servers import ConsulAgent, RedisServer

from .conftest import consul_url


@pytest.fixture
def backend_memory() -> RegistryBackend:
    """Memory registries sharing one store."""
    store = MemoryStore()

    def make(**options: Any) -> ServiceRegistry:
        return MemoryRegistry(store, **options)

    return RegistryBackend("memory", make)


@pytest.fixture
def backend_redis(redis_server: RedisServer) -> RegistryBackend:
    """Redis registries on the session's redis-server, polling every 50 ms."""

    def make(**options: Any) -> ServiceRegistry:
        return RedisRegistry(redis_server.url, poll_interval=0.05, **options)

    return RegistryBackend("redis", make, expired_stay_listed=False)


@pytest.fixture
def backend_consul(consul_agent: ConsulAgent) -> RegistryBackend:
    """Consul registries on the session's dev agent."""

    def make(**options: Any) -> ServiceRegistry:
        options.setdefault("watch_wait", 2.0)
        return ConsulRegistry(consul_url(consul_agent), **options)

    return RegistryBackend("consul", make)


class TestRegistryConformance(RegistryConformance):
    """Every registry backend passes the same suite."""

    @pytest.fixture(
        params=[
            "memory",
            pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("consul", marks=pytest.mark.consul),
        ]
    )
    def registry_backend(self, request: pytest.FixtureRequest) -> RegistryBackend:
        """The backend under test, by name."""
        backend: RegistryBackend = request.getfixturevalue(f"backend_{request.param}")
        return backend
