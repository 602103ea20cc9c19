"""The conformance suite over every real broker through HATransport and BalancedTransport.

The HA layer and the routing layer must not change what a backend promises: the same
suite that holds the bare backends holds them wrapped, over real servers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loom_ha.discovery import MemoryRegistry
from loom_ha.ha import HATransport
from loom_ha.nats import ConsumerOptions, JetStreamTransport, NatsCoreTransport
from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport
from loom_ha.routing import BalancedTransport
from loom_ha.testing.conformance import Backend, TransportConformance
from loom_ha.testing.servers import NatsServer, RedisServer
from loom_ha.transport import Transport

BARE: dict[str, Callable[[RedisServer, NatsServer], Callable[[], Transport]]] = {
    "redis-pubsub": lambda r, n: lambda: RedisPubSubTransport(r.url),
    "redis-streams": lambda r, n: lambda: RedisStreamsTransport(r.url),
    "nats-core": lambda r, n: lambda: NatsCoreTransport([n.url]),
    "nats-jetstream": lambda r, n: (
        lambda: JetStreamTransport(
            [n.url], consumer=ConsumerOptions(heartbeat=0.5, pull_expires=5.0)
        )
    ),
}


def _wrapped(layer: str, bare: Callable[[], Transport]) -> Callable[[], Transport]:
    if layer == "ha":
        return lambda: HATransport(bare())
    # A registry of its own per transport: requests fall back to the broker's group.
    return lambda: BalancedTransport(HATransport(bare()), MemoryRegistry())


class TestWrappedConformance(TransportConformance):
    """HATransport and BalancedTransport over Redis (Pub/Sub, Streams) and NATS (core,
    JetStream) pass the suite of every backend."""

    @pytest.fixture(
        params=[
            pytest.param((layer, name), marks=getattr(pytest.mark, name.split("-")[0]))
            for layer in ("ha", "balanced")
            for name in BARE
        ],
        ids=lambda p: f"{p[0]}-{p[1]}",
    )
    def backend(
        self, request: pytest.FixtureRequest, redis_server: RedisServer, nats_server: NatsServer
    ) -> Backend:
        layer, name = request.param
        factory = _wrapped(layer, BARE[name](redis_server, nats_server))
        return Backend(f"{layer}-{name}", factory, factory().capabilities)
