"""Benchmark rows of the NATS backends, each beside raw nats-py doing the same work.

The raw adapters use the same codec (or none, for the bare-bytes row), so a ratio
measures what loom-ha adds: topic mapping, matching, delivery, acks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from loom_ha.bench.core import (
    LATENCY_P50,
    LATENCY_P99,
    BenchRow,
    Figures,
    Measure,
    compare,
    compared_row,
    latency_of,
    throughput_of,
)
from loom_ha.bench.memory import loom_event_factory

RAW = "raw nats-py (same work, same codec)"


class RawCore:
    """Raw nats-py with Loom's methods: one subject per topic, codec in and out."""

    def __init__(self, servers: list[str], *, codec: Any = None, queue: str = "") -> None:
        from loom_ha.event import EventCodec

        self._servers = servers
        self._codec = codec if codec is not None else EventCodec()
        self._queue = queue
        self._nc: Any = None

    async def connect(self) -> None:
        import nats

        self._nc = await nats.connect(self._servers)

    async def disconnect(self) -> None:
        await self._nc.close()

    async def publish(self, topic: str, event: Any) -> None:
        await self._nc.publish(topic.replace("/", "."), self._codec.encode(event))

    async def subscribe(self, topic: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        decode = self._codec.decode

        async def cb(msg: Any) -> None:
            await handler(decode(msg.data))

        await self._nc.subscribe(topic.replace("/", "."), queue=self._queue, cb=cb)
        await self._nc.flush()


class _Bytes:
    """Passes bytes through: the bare-bytes baseline has no codec at all."""

    @staticmethod
    def encode(event: Any) -> bytes:
        return bytes(event)

    @staticmethod
    def decode(data: bytes) -> bytes:
        return data


class RawJetStream(RawCore):
    """Raw nats-py JetStream: async publish with Msg-Id, a pull consumer that acks."""

    def __init__(self, servers: list[str], *, stream: str, batch: int = 256) -> None:
        super().__init__(servers)
        self._stream = stream
        self._batch = batch
        self._pending: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        await super().connect()
        self._js = self._nc.jetstream()
        await self._js.add_stream(name=self._stream, subjects=[f"{self._stream}.>"])

    async def disconnect(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._js.delete_stream(self._stream)
        await super().disconnect()

    def _subject(self, topic: str) -> str:
        return f"{self._stream}.{topic.replace('/', '.')}"

    async def publish(self, topic: str, event: Any) -> None:
        headers = {"Nats-Msg-Id": event.id}
        self._pending.append(
            await self._js.publish_async(
                self._subject(topic), self._codec.encode(event), headers=headers
            )
        )

    async def subscribe(self, topic: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW, max_ack_pending=2048)
        psub = await self._js.pull_subscribe(
            self._subject(topic), durable=f"raw{uuid.uuid4().hex[:8]}", config=config
        )
        decode = self._codec.decode

        async def run() -> None:
            while True:
                try:
                    msgs = await psub.fetch(self._batch, timeout=1)
                except TimeoutError:  # nats-py's fetch timeout: nothing yet, poll again
                    continue
                for msg in msgs:
                    await handler(decode(msg.data))
                    await msg.ack()

        self._tasks.append(asyncio.get_running_loop().create_task(run()))


class _PipelinedJetStream:
    """Our JetStreamTransport publishing with publish_async (acks awaited at the end)."""

    def __init__(self, transport: Any) -> None:
        self._t = transport
        self._pending: list[Awaitable[None]] = []

    async def connect(self) -> None:
        await self._t.connect()

    async def disconnect(self) -> None:
        await asyncio.gather(*self._pending)
        await self._t.disconnect()

    async def publish(self, topic: str, event: Any) -> None:
        self._pending.append(await self._t.publish_async(topic, event))

    async def subscribe(self, topic: str, handler: Any) -> None:
        await self._t.subscribe(topic, handler)


async def _publish_ack_latency(make: Callable[[], Any], make_event: Any, pings: int) -> float:
    """p50 ms of one publish awaited until the stream acked it."""
    transport = make()
    await transport.connect()
    samples = []
    try:
        for i in range(pings):
            started = time.perf_counter()
            await transport.publish("bench.ack/x", make_event(i))
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await transport.disconnect()
    samples.sort()
    return samples[len(samples) // 2]


class _RawAckPublish(RawJetStream):
    async def publish(self, topic: str, event: Any) -> None:
        headers = {"Nats-Msg-Id": event.id}
        await self._js.publish(self._subject(topic), self._codec.encode(event), headers=headers)


async def nats_rows(servers: list[str], events: int, pings: int, rounds: int = 5) -> list[BenchRow]:
    """NATS core and JetStream figures, each beside raw nats-py in `rounds` alternating rounds."""
    from loom_ha.event import EventCodec, loom_event_class
    from loom_ha.nats import ConsumerOptions, JetStreamTransport, NatsCoreTransport, StreamOptions

    make_event = loom_event_factory()
    codec: EventCodec[Any] = EventCodec(loom_event_class())
    rows: list[BenchRow] = []

    def core() -> Any:
        return NatsCoreTransport(servers, codec=codec, group_rule=None)

    class GroupCore:
        def __init__(self) -> None:
            self._t = core()

        async def connect(self) -> None:
            await self._t.connect()

        async def disconnect(self) -> None:
            await self._t.disconnect()

        async def publish(self, topic: str, event: Any) -> None:
            await self._t.publish(topic, event)

        async def subscribe(self, topic: str, handler: Any) -> None:
            await self._t.subscribe(topic, handler, group="bench")

    payloads = [codec.encode(make_event(i)) for i in range(events)]
    for name, ours, raw, make_raw_event, raw_name in (
        ("nats core throughput", core, lambda: RawCore(servers, codec=codec), make_event, RAW),
        (
            "nats core queue-group throughput",
            GroupCore,
            lambda: RawCore(servers, codec=codec, queue="q"),
            make_event,
            RAW,
        ),
        (
            "nats core vs bare bytes",
            core,
            lambda: RawCore(servers, codec=_Bytes()),
            payloads.__getitem__,
            "raw nats-py, bytes, no codec",
        ),
    ):
        results = await compare(
            throughput_of(ours, make_event, events),
            throughput_of(raw, make_raw_event, events),
            rounds,
        )
        rows.append(compared_row(name, "events/s", results, raw_name))
    results = await compare(
        latency_of(core, make_event, pings),
        latency_of(lambda: RawCore(servers, codec=codec), make_event, pings),
        rounds,
    )
    rows.append(compared_row("nats core request/reply p50", "ms", results, RAW, **LATENCY_P50))
    rows.append(compared_row("nats core request/reply p99", "ms", results, RAW, **LATENCY_P99))

    consumer = ConsumerOptions(heartbeat=1.0, pull_expires=10.0)

    def jetstream() -> Any:
        name = f"BENCH{uuid.uuid4().hex[:6]}"
        return JetStreamTransport(
            servers,
            codec=codec,
            group_rule=None,
            consumer=consumer,
            stream=StreamOptions(name=name, dead_letter_stream=name + "_DLQ", storage="memory"),
            subject_prefix=name.lower(),
            dead_letter_prefix=name.lower() + "dlq",
        )

    def raw_js() -> Any:
        return RawJetStream(servers, stream=f"RAW{uuid.uuid4().hex[:6]}")

    results = await compare(
        throughput_of(lambda: _PipelinedJetStream(jetstream()), make_event, events),
        throughput_of(raw_js, make_event, events),
        rounds,
    )
    rows.append(compared_row("jetstream throughput (async publish, ack)", "events/s", results, RAW))

    def ack_latency(make: Callable[[], Any]) -> Measure:
        async def measure() -> Figures:
            return (await _publish_ack_latency(make, make_event, pings),)

        return measure

    results = await compare(
        ack_latency(jetstream),
        ack_latency(lambda: _RawAckPublish(servers, stream=f"RAW{uuid.uuid4().hex[:6]}")),
        rounds,
    )
    rows.append(compared_row("jetstream publish-ack p50", "ms", results, RAW, **LATENCY_P50))
    results = await compare(
        latency_of(jetstream, make_event, pings, fresh_reply=True),
        # batch=1: nats-py's fetch(n) waits for n messages or its timeout
        latency_of(
            lambda: _RawAckPublish(servers, stream=f"RAW{uuid.uuid4().hex[:6]}", batch=1),
            make_event,
            pings,
            fresh_reply=True,
        ),
        rounds,
    )
    rows.append(compared_row("jetstream request/reply p50", "ms", results, RAW, **LATENCY_P50))
    rows.append(compared_row("jetstream request/reply p99", "ms", results, RAW, **LATENCY_P99))
    return rows
