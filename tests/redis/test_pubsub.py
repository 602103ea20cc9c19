"""RedisPubSubTransport beyond the conformance suite: wire mapping, bad input, recovery."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from loom_ha.deadletter import DeadLetter
from loom_ha.errors import UnsupportedCapabilityError
from loom_ha.event import CloudEvent, EventCodec
from loom_ha.redis import RedisPubSubTransport
from loom_ha.redis.pubsub import glob_escape
from loom_ha.testing.collect import Collector
from loom_ha.testing.servers import RedisServer
from loom_ha.transport import TransportState

from ._redis_helpers import eventually

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
        await asyncio.sleep(0.1)
    assert got.ids == [wanted.id]


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
    entries = await raw.xrange(dead_letters)
    letters = [DeadLetter.from_event(EventCodec().decode(f[b"event"])) for _, f in entries]
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
        await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(
            lambda: (
                t.statistics().reconnects >= 1 and t.statistics().state is TransportState.CONNECTED
            )
        )
        await t.publish(tag + "e", _event())
        await t.publish(tag + "w/1", _event())
        await exact.wait_for(1)
        await wild.wait_for(1)
