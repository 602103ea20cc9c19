"""Runs the shipped conformance suite against both NATS delivery modes."""

from __future__ import annotations

import pytest

from loom_ha.nats import ConsumerOptions, JetStreamTransport, NatsCoreTransport
from loom_ha.testing.conformance import Backend, TransportConformance
from loom_ha.testing.servers import NatsServer

pytestmark = pytest.mark.nats


class TestNatsConformance(TransportConformance):
    """Core NATS and JetStream pass the same suite as every other backend."""

    @pytest.fixture(params=["nats-core", "nats-jetstream"])
    def backend(self, request: pytest.FixtureRequest, nats_server: NatsServer) -> Backend:
        """The NATS mode under test, on the session's JetStream-enabled server."""
        url = nats_server.url
        if request.param == "nats-core":
            return Backend(
                "nats-core", lambda: NatsCoreTransport([url]), NatsCoreTransport.capabilities
            )
        consumer = ConsumerOptions(heartbeat=0.5, pull_expires=5.0)
        return Backend(
            "nats-jetstream",
            lambda: JetStreamTransport([url], consumer=consumer),
            JetStreamTransport.capabilities,
        )
