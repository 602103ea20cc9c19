"""Runs the shipped conformance suite against both NATS delivery modes."""

from __future__ import annotations

import dataclasses
from typing import Any

import nats
import nats.js.errors
import pytest

from loom_ha.backend import SubscriptionKey
from loom_ha.deadletter import DeadLetter
from loom_ha.event import EventCodec, loom_event_class
from loom_ha.nats import ConsumerOptions, JetStreamTransport, NatsCoreTransport
from loom_ha.testing.conformance import Backend, Limits, TransportConformance
from loom_ha.testing.servers import NatsServer
from loom_ha.topics import parse_pattern
from loom_ha.transport import Transport

pytestmark = pytest.mark.nats

# Short heartbeats and pulls keep the suite quick; ack_wait stays at its default (30 s), so a
# member that disconnects and strands an event in an open pull fails the persistence test.
CONSUMER = ConsumerOptions(heartbeat=0.5, pull_expires=5.0)

_LETTERS: EventCodec[Any] = EventCodec(max_size=1 << 30)


def nats_backend(kind: str, url: str) -> Backend:
    """The NATS mode `kind` on the server at `url`, with the durability suite's hooks.

    Raw bytes go on the subject the transport maps the topic to; dead letters are read
    back from the JetStream dead-letter stream (core mode publishes them on the same
    subjects: see conftest's `nats_dead_letter_stream`); unacknowledged events from the group's
    durable consumer.
    """

    def make(consumer: ConsumerOptions = CONSUMER, codec: EventCodec[Any] | None = None) -> Any:
        if kind == "nats-core":
            return NatsCoreTransport([url], codec=codec)
        return JetStreamTransport([url], consumer=consumer, codec=codec)

    def limited(limits: Limits) -> Transport:
        codec = EventCodec(loom_event_class(), max_size=limits.max_event_size)
        consumer = dataclasses.replace(CONSUMER, policy=limits.policy)
        if limits.abandon_after is not None:
            consumer = dataclasses.replace(consumer, ack_wait=limits.abandon_after)
        transport: Transport = make(consumer, codec)
        return transport

    names = JetStreamTransport([url])  # never connected: subjects, streams, consumer names

    async def inject_raw(topic: str, payload: bytes) -> None:
        nc = await nats.connect(url)
        try:
            if kind == "nats-core":
                await nc.publish(names.subjects.subject(topic), payload)
                await nc.flush()
            else:
                await nc.jetstream().publish(names.subjects.subject(topic), payload)
        finally:
            await nc.close()

    async def dead_letters(topic: str) -> list[DeadLetter]:
        subject, stream = names.subjects.dead_letter_subject(topic), names.stream.dead_letter_stream
        letters: list[DeadLetter] = []
        nc = await nats.connect(url)
        try:
            js, seq = nc.jetstream(), 1
            while True:
                try:
                    msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    return letters
                letters.append(DeadLetter.from_event(_LETTERS.decode(msg.data or b"")))
                assert msg.seq is not None
                seq = msg.seq + 1
        finally:
            await nc.close()

    async def unacked(topic: str, group: str) -> int:
        consumer = names.consumer_name(SubscriptionKey(parse_pattern(topic), group))
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().consumer_info(names.stream.name, consumer)
        finally:
            await nc.close()
        return int(info.num_ack_pending or 0)

    return Backend(
        kind,
        make,
        (NatsCoreTransport if kind == "nats-core" else JetStreamTransport).capabilities,
        limited=limited,
        inject_raw=inject_raw,
        dead_letters=dead_letters,
        unacked=unacked if kind == "nats-jetstream" else None,
    )


class TestNatsConformance(TransportConformance):
    """Core NATS and JetStream pass the same suite as every other backend."""

    @pytest.fixture(params=["nats-core", "nats-jetstream"])
    def backend(
        self, request: pytest.FixtureRequest, nats_server: NatsServer, nats_dead_letter_stream: str
    ) -> Backend:
        """The NATS mode under test, on the session's JetStream-enabled server."""
        return nats_backend(request.param, nats_server.url)
