"""Benchmark rows of the Redis transports beside raw redis-py doing the same work, same codec.

loom-ha's side is the default path (`create_transport`, HATransport and dedup included)
with the bare backend below it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

from loom_ha.bench.core import BenchRow, latency_rows, throughput_rows
from loom_ha.bench.memory import loom_event_factory
from loom_ha.redis._base import PIPELINE_BATCH

RAW = "raw redis-py (same codec)"


class RawPubSub:
    """The baseline: redis-py PUBLISH and its PubSub reader, nothing else."""

    def __init__(self, url: str, codec: Any) -> None:
        self._url = url
        self.codec = codec
        self._handlers: dict[str, Any] = {}
        self._confirmed: dict[str, asyncio.Event] = {}

    async def connect(self) -> None:
        import redis.asyncio as aioredis

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

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """redis-py pipelines of `PIPELINE_BATCH` PUBLISH commands (loom-ha's batch size)."""
        for batch in _batches(items):
            pipe = self.client.pipeline(transaction=False)
            for topic, event in batch:
                pipe.publish(topic, self.codec.encode(event))
            await pipe.execute()

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        pubsub: Any = self.pubsub
        await pubsub.aclose()
        await self.client.aclose()


class RawStreams:
    """The baseline: XADD, and one XREADGROUP + XACK loop per topic."""

    def __init__(self, url: str, codec: Any) -> None:
        self._url = url
        self.codec = codec
        self._readers: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        import redis.asyncio as aioredis

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

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """redis-py pipelines of `PIPELINE_BATCH` XADD commands (loom-ha's batch size)."""
        for batch in _batches(items):
            pipe = self.client.pipeline(transaction=False)
            for topic, event in batch:
                fields = {"event": self.codec.encode(event)}
                pipe.xadd(f"raw:{topic}", fields, maxlen=100_000, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()

    async def disconnect(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self.client.aclose()
        await self.reader.aclose()


def _batches(items: Iterable[tuple[str, Any]]) -> Iterator[list[tuple[str, Any]]]:
    batch: list[tuple[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == PIPELINE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def redis_rows(url: str, events: int, pings: int, rounds: int = 5) -> list[BenchRow]:
    """Pub/Sub and Streams throughput (one round trip per event, and pipelined), Pub/Sub
    ping-pong latency: the default path (and the bare backend) beside raw redis-py, in
    `rounds` alternating rounds."""
    from loom_ha.bench.ha import default_path, with_options
    from loom_ha.event import EventCodec, loom_event_class

    make_event = loom_event_factory()
    event_class = loom_event_class()
    codec: EventCodec[Any] = EventCodec(event_class)
    pubsub = default_path(with_options(url, mode="pubsub"), event_class=event_class)
    streams = default_path(with_options(url, mode="streams"), event_class=event_class)

    def raw_pubsub() -> Any:
        return RawPubSub(url, codec)

    def raw_streams() -> Any:
        return RawStreams(url, codec)

    rows = []
    for name, path, raw, pipelined, group in (
        ("redis pubsub throughput", pubsub, raw_pubsub, False, None),
        ("redis pubsub throughput (pipelined)", pubsub, raw_pubsub, True, None),
        ("redis streams throughput (group+ack)", streams, raw_streams, False, "bench"),
        ("redis streams throughput (pipelined, group+ack)", streams, raw_streams, True, "bench"),
    ):
        rows += await throughput_rows(
            name,
            path,
            raw,
            RAW,
            make_event=make_event,
            events=events,
            rounds=rounds,
            pipelined=pipelined,
            group=group,
        )
    rows += await latency_rows(
        "redis pubsub ping-pong",
        pubsub,
        raw_pubsub,
        RAW,
        make_event=make_event,
        pings=pings,
        rounds=rounds,
    )
    return rows
