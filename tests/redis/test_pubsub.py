"""RedisPubSubTransport beyond the conformance suite: wire mapping, bad input, recovery."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from loom_ha.deadletter import DeadLetter
from loom_ha.errors import UnsupportedCapabilityError
from loom_ha.event import CloudEvent, EventCodec
from loom_ha.redis import RedisPubSubTransport
from loom_ha.redis.pubsub import glob_escape
from loom_ha.testing.collect import Collector, publish_markers, without_markers
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import RedisServer
from loom_ha.transport import TransportState

from ._redis_helpers import eventually, while_frozen

pytestmark = pytest.mark.redis


def _event(n: int = 0) -> CloudEvent:
    return CloudEvent.create(source="/test", type="t", data={"n": n})


def test_glob_escape_covers_every_metacharacter() -> None:
    """Glob metacharacters in a topic are escaped so the pattern matches only literally."""
    assert glob_escape(b"a*b?c[d]e\\f") == b"a\\*b\\?c\\[d\\]e\\\\f"


async def test_glob_characters_in_topics_match_literally(
    redis_server: RedisServer, tag: str
) -> None:
    """A prefix pattern containing `[`, `?` and `*`-free globs matches only its literal prefix."""
    got = Collector()
    async with RedisPubSubTransport(redis_server.url) as t:
        await t.subscribe(tag + "a[b]?*", got)
        await t.publish(tag + "ab?x", _event(1))  # would match the unescaped glob
        wanted = _event(2)
        await t.publish(tag + "a[b]?x", wanted)
        await got.wait_for(1)
        # Published after both on one connection: once it is here, "ab?x" would be too.
        markers = await publish_markers(t, tag + "a[b]?y", got)
    assert without_markers(got.ids, markers) == [wanted.id]


async def test_malformed_messages_are_dead_lettered_and_listening_goes_on(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """Garbage on a channel is counted, dead-lettered with its reason, and nothing else is lost."""
    got = Collector()
    dead_letters = f"{tag}deadletter"
    async with RedisPubSubTransport(redis_server.url, dead_letter_stream=dead_letters) as t:
        await t.subscribe(tag + "x", got)
        await raw.publish(f"loom:{tag}x", b"not json at all")
        await raw.publish(f"loom:{tag}x", b'{"specversion":"0.3","id":"1","source":"s","type":"t"}')
        await t.publish(tag + "x", _event())
        await got.wait_for(1)
        await eventually(lambda: t.statistics().dead_lettered >= 2)
        stats = t.statistics()
    assert stats.malformed == 2 and stats.dead_lettered == 2
    letters = []
    for _, fields in await raw.xrange(dead_letters) or []:
        assert fields is not None
        letters.append(DeadLetter.from_event(EventCodec().decode(fields[b"event"])))
    assert letters[0].raw == b"not json at all"
    assert all(lt.reason and lt.topic == tag + "x" for lt in letters)
    assert "specversion" in letters[1].reason


async def test_groups_are_refused_and_rule_groups_fan_out(
    redis_server: RedisServer, tag: str
) -> None:
    """group= raises UnsupportedCapabilityError; node.request topics reach every instance."""
    a, b = Collector("a"), Collector("b")
    topic = f"node.request/node/{tag[:-1]}"
    async with (
        RedisPubSubTransport(redis_server.url) as ta,
        RedisPubSubTransport(redis_server.url) as tb,
    ):
        with pytest.raises(UnsupportedCapabilityError):
            await ta.subscribe(tag + "jobs", a, group="workers")
        await ta.subscribe(topic, a)
        await tb.subscribe(topic, b)
        await ta.publish(topic, _event())
        await a.wait_for(1)
        await b.wait_for(1)


async def test_listener_resubscribes_after_its_connection_is_killed(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """After CLIENT KILL of the Pub/Sub connection every subscription is restored."""
    exact, wild = Collector("exact"), Collector("wild")
    async with RedisPubSubTransport(redis_server.url) as t:
        await t.subscribe(tag + "e", exact)
        await t.subscribe(tag + "w/*", wild)
        await raw.client_kill_filter(_type="pubsub")
        await eventually(
            lambda: (
                t.statistics().reconnects >= 1 and t.statistics().state is TransportState.CONNECTED
            )
        )
        await t.publish(tag + "e", _event())
        await t.publish(tag + "w/1", _event())
        await exact.wait_for(1)
        await wild.wait_for(1)


async def test_idle_listener_keeps_its_connection(redis_server: RedisServer) -> None:
    """An idle listener whose PINGs are answered is never dropped, even on a busy event loop."""
    interval = 0.05
    jitter = random.Random(0)

    async def busy_loop() -> None:  # handlers that block a little: timers and replies run late
        while True:
            time.sleep(jitter.uniform(0, 0.002))  # noqa: ASYNC251 - blocking is the point
            await asyncio.sleep(0)

    async with (
        RedisPubSubTransport(redis_server.url, health_check_interval=interval) as t,
        asyncio.TaskGroup() as tg,
    ):
        noise = tg.create_task(busy_loop())
        # A negative check: 60 watchdog intervals pass without a reconnect. (Judging by idle
        # time alone dropped such a listener 2-3 times in 60 intervals.)
        await asyncio.sleep(60 * interval)
        noise.cancel()
        stats = t.statistics()
    assert stats.reconnects == 0, stats.extra


@pytest.mark.chaos
async def test_frozen_server_is_noticed_by_the_listener(server_launcher: ServerLauncher) -> None:
    """A server that stops answering (SIGSTOP) makes the listener reconnect once it is back."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    async with RedisPubSubTransport(server.url, health_check_interval=0.1) as t:
        await t.subscribe("frozen/x", got)
        server.pause()
        try:
            await eventually(lambda: t.statistics().state is TransportState.RECONNECTING)
        finally:
            server.resume()
        await eventually(lambda: t.statistics().state is TransportState.CONNECTED)
        await t.publish("frozen/x", _event())
        await got.wait_for(1)
        assert t.statistics().reconnects >= 1


@pytest.mark.chaos
async def test_publish_without_reply_is_not_sent_twice(server_launcher: ServerLauncher) -> None:
    """A PUBLISH whose reply times out is not re-sent: it arrives once, and is counted."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    async with (
        RedisPubSubTransport(server.url, health_check_interval=30) as sub,
        RedisPubSubTransport(server.url, socket_timeout=0.3) as pub,
    ):
        await sub.subscribe("once/x", got)
        first = _event(1)
        await while_frozen(server, pub.publish("once/x", first))
        marker = _event(2)
        await pub.publish("once/x", marker)
        await got.wait_until(lambda: marker.id in got.ids, what=lambda: "the marker")
        stats = pub.statistics()
    assert got.ids.count(first.id) == 1, got.ids
    assert stats.extra is not None and stats.extra["unconfirmed"] == 1
    assert stats.published == 1  # only the confirmed one


async def test_dropped_listener_does_not_cut_publishes(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """CLIENT KILL of the listener reconnects the listener only: publishes in flight go on."""
    got = Collector()
    async with RedisPubSubTransport(redis_server.url) as t:
        await t.subscribe(tag + "x", got)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_publish_many(t, tag + "x", 2000))
            await got.wait_for(100)
            await raw.client_kill_filter(_type="pubsub")
            await eventually(lambda: (t.statistics().extra or {}).get("listener_reconnects", 0) > 0)
        stats = t.statistics()
        assert t.connector.reconnects == 0  # the master was never given up
    assert stats.extra is not None and stats.extra["unconfirmed"] == 0
    assert stats.published == 2000


async def _publish_many(t: RedisPubSubTransport, topic: str, count: int) -> None:
    for n in range(count):
        await t.publish(topic, _event(n))


@pytest.mark.chaos
async def test_pipelined_publishes_without_reply_are_not_sent_twice(
    server_launcher: ServerLauncher,
) -> None:
    """A `publish_many` batch whose replies time out is not re-sent; each event is counted."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    async with (
        RedisPubSubTransport(server.url, health_check_interval=30) as sub,
        RedisPubSubTransport(server.url, socket_timeout=0.3) as pub,
    ):
        await sub.subscribe("many/x", got)
        batch = [_event(n) for n in range(50)]
        await while_frozen(server, pub.publish_many(("many/x", e) for e in batch))
        marker = _event(99)
        await pub.publish("many/x", marker)
        await got.wait_until(lambda: marker.id in got.ids, what=lambda: "the marker")
        stats = pub.statistics()
    assert got.ids == [e.id for e in batch] + [marker.id]  # each once, in order
    assert stats.extra is not None and stats.extra["unconfirmed"] == len(batch)
    assert stats.published == 1  # only the marker was confirmed


async def test_publishing_starts_no_task_per_command(redis_server: RedisServer, tag: str) -> None:
    """A timed write is bounded by a timer, not by redis-py's task-per-write `wait_for`."""
    got = Collector()
    loop = asyncio.get_running_loop()
    created: list[object] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro)
        if factory is not None:
            return factory(loop, coro, **kwargs)  # type: ignore[return-value]
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with RedisPubSubTransport(redis_server.url) as t:
        await t.subscribe(tag + "x", got)
        await t.publish(tag + "x", _event())  # the connections exist from here on
        await got.wait_for(1)
        loop.set_task_factory(counting)
        try:
            for n in range(100):
                await t.publish(tag + "x", _event(n))
            await got.wait_for(101)
        finally:
            loop.set_task_factory(factory)
    assert created == []


@pytest.mark.chaos
async def test_a_write_the_server_does_not_take_times_out(server_launcher: ServerLauncher) -> None:
    """A write stuck on a frozen server ends after `socket_timeout`: unconfirmed, not hung."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    big = "x" * 900_000  # 20 of these fill every socket buffer between us and Redis
    async with (
        RedisPubSubTransport(server.url, health_check_interval=30) as sub,
        RedisPubSubTransport(server.url, socket_timeout=0.3) as pub,
    ):
        await sub.subscribe("big/x", got)
        await pub.publish("big/x", _event())  # the connections exist from here on
        await got.wait_for(1)
        server.pause()
        try:
            batch = [CloudEvent.create(source="/t", type="t", data=big) for _ in range(20)]
            async with asyncio.timeout(5):  # far above the 0.3 s the write may take
                await pub.publish_many(("big/x", e) for e in batch)
        finally:
            server.resume()
        stats = pub.statistics()
        marker = _event(99)
        await pub.publish("big/x", marker)
        await got.wait_until(lambda: marker.id in got.ids, what=lambda: "the marker")
    assert stats.extra is not None and stats.extra["unconfirmed"] == len(batch)
    assert stats.published == 1
    assert all(got.ids.count(e.id) <= 1 for e in batch)  # at most once, even if partly written
