"""Benchmark rows of the NATS backends, each beside raw nats-py doing the same work.

loom-ha's side is the default path (`create_transport`, HATransport and dedup included)
with the bare backend below it. The raw adapters use the same codec (or none, for the
bare-bytes row), so a ratio measures what loom-ha adds: the HA layer, topic mapping,
matching, delivery, acks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from loom_ha.bench.core import (
    LATENCY_P50,
    PING_TOPIC,
    PONG_TOPIC,
    THROUGHPUT_TOPIC,
    BenchRow,
    Figures,
    MakeTransport,
    Measure,
    latency_rows,
    path_rows,
    throughput_rows,
)
from loom_ha.bench.memory import loom_event_factory

RAW = "raw nats-py (same codec)"


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
    """Raw nats-py JetStream: publish with Msg-Id awaiting the ack (`publish_many`: all sent
    with publish_async, then every ack awaited), a pull consumer that acks."""

    def __init__(self, servers: list[str], *, codec: Any, stream: str, batch: int = 256) -> None:
        super().__init__(servers, codec=codec)
        self._stream = stream
        self._batch = batch
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
        await self._js.publish(self._subject(topic), self._codec.encode(event), headers=headers)

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        acks = []
        for topic, event in items:
            headers = {"Nats-Msg-Id": event.id}
            data = self._codec.encode(event)
            acks.append(await self._js.publish_async(self._subject(topic), data, headers=headers))
        await asyncio.gather(*acks)

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


ACK_TOPIC = "bench.ack/x"


async def _publish_ack_latency(make: MakeTransport, make_event: Any, pings: int) -> Figures:
    """(p50 ms,) of one publish awaited until the stream acked it."""
    transport = make()
    await transport.connect()
    samples = []
    try:
        for i in range(pings):
            started = time.perf_counter()
            await transport.publish(ACK_TOPIC, make_event(i))
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await transport.disconnect()
    samples.sort()
    return (samples[len(samples) // 2],)


def _purger(servers: list[str]) -> Callable[[], Awaitable[None]]:
    """Drops the bench's events from the default stream after each run, so every round
    starts with the same stream and a broker given by ``--url`` keeps none of them."""

    async def purge() -> None:
        import nats

        from loom_ha.nats import StreamOptions
        from loom_ha.nats.subjects import SubjectCodec

        subjects = SubjectCodec()
        nc = await nats.connect(servers)
        try:
            js = nc.jetstream()
            for topic in (THROUGHPUT_TOPIC, PING_TOPIC, PONG_TOPIC, ACK_TOPIC):
                await js.purge_stream(StreamOptions().name, subject=subjects.subject(topic))
        finally:
            await nc.close()

    return purge


async def nats_rows(servers: list[str], events: int, pings: int, rounds: int = 5) -> list[BenchRow]:
    """NATS core and JetStream figures: the default path (and the bare backend) beside raw
    nats-py with the same codec, in `rounds` alternating rounds."""
    from loom_ha.bench.ha import default_path, with_options
    from loom_ha.event import EventCodec, loom_event_class

    make_event = loom_event_factory()
    event_class = loom_event_class()
    codec: EventCodec[Any] = EventCodec(event_class)
    url = ",".join(servers)
    core = default_path(with_options(url, mode="core"), event_class=event_class)

    def raw_core(queue: str = "", codec: Any = codec) -> MakeTransport:
        return lambda: RawCore(servers, codec=codec, queue=queue)

    payloads = [codec.encode(make_event(i)) for i in range(events)]
    bare_bytes = "raw nats-py, bytes, no codec"
    rows: list[BenchRow] = []
    for name, raw, raw_name, group, raw_event in (
        ("nats core throughput", raw_core(), RAW, None, None),
        ("nats core queue-group throughput", raw_core(queue="q"), RAW, "bench", None),
        (
            "nats core vs bare bytes",
            raw_core(codec=_Bytes()),
            bare_bytes,
            None,
            payloads.__getitem__,
        ),
    ):
        rows += await throughput_rows(
            name,
            core,
            raw,
            raw_name,
            make_event=make_event,
            events=events,
            rounds=rounds,
            group=group,
            baseline_event=raw_event,
        )
    rows += await latency_rows(
        "nats core request/reply",
        core,
        raw_core(),
        RAW,
        pings=pings,
        make_event=make_event,
        rounds=rounds,
    )

    jetstream = default_path(
        with_options(url, mode="jetstream"), event_class=event_class, cleanup=_purger(servers)
    )

    def raw_js(batch: int = 256) -> MakeTransport:
        def make() -> RawJetStream:
            stream = f"RAW{uuid.uuid4().hex[:6]}"
            return RawJetStream(servers, codec=codec, stream=stream, batch=batch)

        return make

    for name, pipelined in (
        ("jetstream throughput (awaited publish, ack)", False),
        ("jetstream throughput (pipelined, ack)", True),
    ):
        rows += await throughput_rows(
            name,
            jetstream,
            raw_js(),
            RAW,
            events=events,
            pipelined=pipelined,
            make_event=make_event,
            rounds=rounds,
        )

    def ack_latency(make: MakeTransport) -> Measure:
        async def measure() -> Figures:
            return await _publish_ack_latency(make, make_event, pings)

        return measure

    rows += await path_rows(
        jetstream,
        ack_latency,
        ack_latency(raw_js()),
        RAW,
        rounds,
        [("jetstream publish-ack p50", "ms", LATENCY_P50)],
    )
    # batch=1: nats-py's fetch(n) waits for n messages or its timeout
    rows += await latency_rows(
        "jetstream request/reply",
        jetstream,
        raw_js(batch=1),
        RAW,
        pings=pings,
        fresh_reply=True,
        make_event=make_event,
        rounds=rounds,
    )
    return rows
