"""The conformance suite over every real broker through HATransport and BalancedTransport.

The HA layer and the routing layer must not change what a backend promises: the same
suite that holds the bare backends holds them wrapped, over real servers. The durability
hooks (raw bytes, dead letters, unacknowledged entries) are the bare backend's: they read
and write the broker, which the wrappers leave as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from loom_ha.discovery import MemoryRegistry
from loom_ha.ha import HATransport
from loom_ha.routing import BalancedTransport
from loom_ha.testing.conformance import Backend, Limits, TransportConformance
from loom_ha.testing.servers import NatsServer, RedisServer
from loom_ha.transport import Transport

from .test_nats import nats_backend
from .test_redis import redis_backend

BARE = ["redis-pubsub", "redis-streams", "nats-core", "nats-jetstream"]


def _wrapper(layer: str) -> Callable[[Transport], Transport]:
    if layer == "ha":
        return HATransport
    # A registry of its own per transport: requests fall back to the broker's group.
    return lambda inner: BalancedTransport(HATransport(inner), MemoryRegistry())


def _wrapped(layer: str, bare: Backend) -> Backend:
    wrap, make, limited = _wrapper(layer), bare.factory, bare.limited

    def wrapped_limited(limits: Limits) -> Transport:
        assert limited is not None
        return wrap(limited(limits))

    return dataclasses.replace(
        bare,
        name=f"{layer}-{bare.name}",
        factory=lambda: wrap(make()),
        capabilities=wrap(make()).capabilities,
        limited=wrapped_limited if limited is not None else None,
    )


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
        self,
        request: pytest.FixtureRequest,
        redis_server: RedisServer,
        nats_server: NatsServer,
        nats_dead_letter_stream: str,
    ) -> Backend:
        layer, name = request.param
        if name.startswith("redis"):
            return _wrapped(layer, redis_backend(name, redis_server.url))
        return _wrapped(layer, nats_backend(name, nats_server.url))
