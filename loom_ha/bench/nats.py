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

from loom_ha.bench.core import BenchRow, measure_latency, measure_throughput
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


_Maker = tuple[Callable[[], Any], Callable[[int], Any]]


async def _paired_throughput(
    ours: _Maker, baseline: _Maker, events: int, rounds: int = 5
) -> tuple[float, float]:
    """Best of `rounds` interleaved runs of each: on a shared machine a slow spell then
    hits both sides alike instead of deciding the ratio (one run each swung it ±30 %)."""
    best_ours = best_base = 0.0
    for _ in range(rounds):
        best_ours = max(best_ours, await measure_throughput(*ours, events))
        best_base = max(best_base, await measure_throughput(*baseline, events))
    return best_ours, best_base


async def nats_rows(servers: list[str], events: int, pings: int) -> list[BenchRow]:
    """NATS core and JetStream figures, each beside raw nats-py measured in the same run."""
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

    ours, raw = await _paired_throughput(
        (core, make_event), (lambda: RawCore(servers, codec=codec), make_event), events
    )
    rows.append(BenchRow("nats core throughput", "events/s", ours, raw, RAW))
    ours, raw = await _paired_throughput(
        (GroupCore, make_event),
        (lambda: RawCore(servers, codec=codec, queue="q"), make_event),
        events,
    )
    rows.append(BenchRow("nats core queue-group throughput", "events/s", ours, raw, RAW))
    payloads = [codec.encode(make_event(i)) for i in range(events)]
    ours, raw = await _paired_throughput(
        (core, make_event),
        (lambda: RawCore(servers, codec=_Bytes()), lambda i: payloads[i]),
        events,
    )
    rows.append(
        BenchRow("nats core vs bare bytes", "events/s", ours, raw, "raw nats-py, bytes, no codec")
    )
    p50, p99 = await measure_latency(core, make_event, pings)
    r50, r99 = await measure_latency(lambda: RawCore(servers, codec=codec), make_event, pings)
    rows.append(BenchRow("nats core request/reply p50", "ms", p50, r50, RAW, False))
    rows.append(BenchRow("nats core request/reply p99", "ms", p99, r99, RAW, False))

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

    ours = await measure_throughput(lambda: _PipelinedJetStream(jetstream()), make_event, events)
    raw = await measure_throughput(raw_js, make_event, events)
    rows.append(BenchRow("jetstream throughput (async publish, ack)", "events/s", ours, raw, RAW))
    p50 = await _publish_ack_latency(jetstream, make_event, pings)
    r50 = await _publish_ack_latency(
        lambda: _RawAckPublish(servers, stream=f"RAW{uuid.uuid4().hex[:6]}"), make_event, pings
    )
    rows.append(BenchRow("jetstream publish-ack p50", "ms", p50, r50, RAW, False))
    p50, p99 = await measure_latency(jetstream, make_event, pings, fresh_reply=True)
    r50, r99 = await measure_latency(
        # batch=1: nats-py's fetch(n) waits for n messages or its timeout
        lambda: _RawAckPublish(servers, stream=f"RAW{uuid.uuid4().hex[:6]}", batch=1),
        make_event,
        pings,
        fresh_reply=True,
    )
    rows.append(BenchRow("jetstream request/reply p50", "ms", p50, r50, RAW, False))
    rows.append(BenchRow("jetstream request/reply p99", "ms", p99, r99, RAW, False))
    return rows
