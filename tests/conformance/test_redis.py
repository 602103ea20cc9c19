"""Runs the shipped conformance suite against the Redis modes on the session redis-server."""

from __future__ import annotations

import pytest

from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport, RedisTransport
from loom_ha.testing.conformance import Backend, TransportConformance
from loom_ha.testing.servers import RedisServer

pytestmark = pytest.mark.redis

# Streams by default; replies, the suite's ".../a" topics and its burst go over Pub/Sub. So
# `*`, `<prefix>*` and `*/node/echo<tag>` subscriptions span both modes.
MIXED_TOPIC_MODES = {"node.response/*": "pubsub", "*/a": "pubsub", "*/burst": "pubsub"}


@pytest.fixture
def backend_redis_pubsub(redis_server: RedisServer) -> Backend:
    """Pub/Sub mode: at-most-once, fan-out only."""
    return Backend(
        "redis-pubsub",
        lambda: RedisPubSubTransport(redis_server.url),
        RedisPubSubTransport.capabilities,
    )


@pytest.fixture
def backend_redis_streams(redis_server: RedisServer) -> Backend:
    """Streams mode: at-least-once, consumer groups, short retry backoff for the suite."""
    return Backend(
        "redis-streams",
        lambda: RedisStreamsTransport(redis_server.url),
        RedisStreamsTransport.capabilities,
    )


@pytest.fixture
def backend_redis_mixed(redis_server: RedisServer) -> Backend:
    """RedisTransport with topics in both modes: declares the weaker capability of each."""

    def make() -> RedisTransport:
        return RedisTransport(redis_server.url, mode="streams", topic_modes=MIXED_TOPIC_MODES)

    return Backend("redis-mixed", make, make().capabilities)


class TestRedisConformance(TransportConformance):
    """Every Redis mode, and both mixed in one transport, pass the suite of every backend."""

    @pytest.fixture(params=["redis-pubsub", "redis-streams", "redis-mixed"])
    def backend(self, request: pytest.FixtureRequest) -> Backend:
        """The Redis backend under test, by mode."""
        backend: Backend = request.getfixturevalue(f"backend_{request.param.replace('-', '_')}")
        return backend
