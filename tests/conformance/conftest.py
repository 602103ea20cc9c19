"""Fixtures the conformance modules share."""

from __future__ import annotations

import asyncio

import pytest

from loom_ha.nats import JetStreamTransport
from loom_ha.testing.servers import NatsServer


@pytest.fixture(scope="session")
def nats_dead_letter_stream(nats_server: NatsServer) -> str:
    """The JetStream dead-letter stream (``LOOM_DLQ`` on ``loomdlq.>``) on the session server.

    Core mode publishes dead letters on ``loomdlq.<topic>`` for whoever listens; alongside
    JetStream (as here) that stream keeps them, and the suite reads them back from it. A
    JetStreamTransport creates it on connect.
    """

    async def create() -> str:
        async with JetStreamTransport([nats_server.url]) as js:
            return js.stream.dead_letter_stream

    return asyncio.run(create())
