"""Benchmark rows of the Redis transports beside raw redis-py doing the same work, same codec."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from loom_ha.bench.core import BenchRow, measure_latency, measure_throughput

RAW = "raw redis-py (same codec)"


class RawPubSub:
    """The baseline: redis-py PUBLISH and its PubSub reader, nothing else."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._handlers: dict[str, Any] = {}
        self._confirmed: dict[str, asyncio.Event] = {}

    async def connect(self) -> None:
        import redis.asyncio as aioredis

        from loom_ha.event import EventCodec

        self.codec: EventCodec[Any] = EventCodec()
        self.client = aioredis.Redis.from_url(self._url, protocol=2)
        self.pubsub = self.client.pubsub()
        self._reader: asyncio.Task[None] | None = None

    async def subscribe(self, topic: str, handler: Any) -> None:
        self._handlers[topic] = handler
        confirmed = self._confirmed[topic] = asyncio.Event()
        await self.pubsub.subscribe(topic)
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        async with asyncio.timeout(5):  # wait for the confirmation, like ours does
            await confirmed.wait()

    async def _read(self) -> None:
        from loom_ha.redis.connection import checkpoint

        async for message in self.pubsub.listen():
            checkpoint()  # redis-py may swallow our cancellation (see checkpoint's docstring)
            topic = message["channel"].decode()
            if message["type"] == "message":
                await self._handlers[topic](self.codec.decode(message["data"]))
            elif message["type"] == "subscribe":
                self._confirmed[topic].set()

    async def publish(self, topic: str, event: Any) -> None:
        await self.client.publish(topic, self.codec.encode(event))

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        pubsub: Any = self.pubsub
        await pubsub.aclose()
        await self.client.aclose()


class RawStreams:
    """The baseline: XADD, and one XREADGROUP + XACK loop per topic."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._readers: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        import redis.asyncio as aioredis

        from loom_ha.event import EventCodec

        self.codec: EventCodec[Any] = EventCodec()
        self.client = aioredis.Redis.from_url(self._url, protocol=2)
        self.reader = aioredis.Redis.from_url(self._url, protocol=2)

    async def subscribe(self, topic: str, handler: Any) -> None:
        key = f"raw:{topic}"
        await self.client.delete(key)
        await self.client.xgroup_create(key, "g", id="$", mkstream=True)
        self._readers.append(asyncio.ensure_future(self._read(key, handler)))

    async def _read(self, key: str, handler: Any) -> None:
        from loom_ha.redis.connection import checkpoint

        while True:
            reply: Any = await self.reader.xreadgroup("g", "c", {key: ">"}, count=100, block=1000)
            checkpoint()  # redis-py may swallow our cancellation (see checkpoint's docstring)
            for _, entries in reply or ():
                for _, fields in entries:
                    await handler(self.codec.decode(fields[b"event"]))
                await self.reader.xack(key, "g", *[i for i, _ in entries])

    async def publish(self, topic: str, event: Any) -> None:
        await self.client.xadd(
            f"raw:{topic}", {"event": self.codec.encode(event)}, maxlen=100_000, approximate=True
        )

    async def disconnect(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self.client.aclose()
        await self.reader.aclose()


def _event_factory() -> Callable[[int], Any]:
    from loom_ha.event import CloudEvent

    def make(i: int) -> Any:
        return CloudEvent(source="/node/bench", type="bench", data={"n": i, "task": "hello"})

    return make


async def redis_rows(url: str, events: int, pings: int) -> list[BenchRow]:
    """Pub/Sub and Streams throughput, Pub/Sub ping-pong latency: loom-ha beside raw redis-py."""
    from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport

    make_event = _event_factory()

    def pubsub() -> Any:
        return RedisPubSubTransport(url, group_rule=None)

    def streams() -> Any:
        return RedisStreamsTransport(url, group_rule=None, stream_prefix="bench:stream:")

    def raw_pubsub() -> Any:
        return RawPubSub(url)

    def raw_streams() -> Any:
        return RawStreams(url)

    ours_ps = await measure_throughput(pubsub, make_event, events)
    base_ps = await measure_throughput(raw_pubsub, make_event, events)
    ours_st = await _streams_throughput(streams, make_event, events)
    base_st = await measure_throughput(raw_streams, make_event, events)
    ours_p50, ours_p99 = await measure_latency(pubsub, make_event, pings)
    base_p50, base_p99 = await measure_latency(raw_pubsub, make_event, pings)
    return [
        BenchRow("redis pubsub throughput", "events/s", ours_ps, base_ps, RAW),
        BenchRow("redis streams throughput (group+ack)", "events/s", ours_st, base_st, RAW),
        BenchRow("redis pubsub ping-pong p50", "ms", ours_p50, base_p50, RAW, False),
        BenchRow("redis pubsub ping-pong p99", "ms", ours_p99, base_p99, RAW, False),
    ]


async def _streams_throughput(
    factory: Callable[[], Any], make_event: Callable[[int], Any], events: int
) -> float:
    """Streams throughput through a consumer group (as the raw baseline reads)."""

    class Grouped:
        def __init__(self) -> None:
            self.inner = factory()

        async def connect(self) -> None:
            await self.inner.connect()

        async def subscribe(self, topic: str, handler: Any) -> None:
            await self.inner.subscribe(topic, handler, group="bench")

        async def publish(self, topic: str, event: Any) -> None:
            await self.inner.publish(topic, event)

        async def disconnect(self) -> None:
            await self.inner.disconnect()

    return await measure_throughput(Grouped, make_event, events)
