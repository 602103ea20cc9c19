"""Runs the shipped conformance suite against both Redis modes on the session redis-server."""

from __future__ import annotations

import pytest

from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport
from loom_ha.testing.conformance import Backend, TransportConformance
from loom_ha.testing.servers import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def backend_redis_pubsub(redis_server: RedisServer) -> Backend:
    """Pub/Sub mode: at-most-once, fan-out only."""
    return Backend(
        "redis-pubsub",
        lambda: RedisPubSubTransport(redis_server.url),
        RedisPubSubTransport.capabilities,
        settle=0.1,
    )


@pytest.fixture
def backend_redis_streams(redis_server: RedisServer) -> Backend:
    """Streams mode: at-least-once, consumer groups, short retry backoff for the suite."""
    return Backend(
        "redis-streams",
        lambda: RedisStreamsTransport(redis_server.url),
        RedisStreamsTransport.capabilities,
        settle=0.1,
    )


class TestRedisConformance(TransportConformance):
    """Both Redis modes pass the same suite as every other backend."""

    @pytest.fixture(params=["redis-pubsub", "redis-streams"])
    def backend(self, request: pytest.FixtureRequest) -> Backend:
        """The Redis backend under test, by mode."""
        backend: Backend = request.getfixturevalue(f"backend_{request.param.replace('-', '_')}")
        return backend
