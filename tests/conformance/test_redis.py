"""Runs the shipped conformance suite against the Redis modes on the session redis-server."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from loom_ha.deadletter import DeadLetter
from loom_ha.event import EventCodec
from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport, RedisTransport
from loom_ha.redis.pubsub import wire
from loom_ha.testing.conformance import Backend, Limits, TransportConformance
from loom_ha.testing.servers import RedisServer
from loom_ha.transport import Transport

pytestmark = pytest.mark.redis

# Streams by default; replies, the suite's ".../a" topics and its burst go over Pub/Sub. So
# `*`, `<prefix>*` and `*/node/echo<tag>` subscriptions span both modes.
MIXED_TOPIC_MODES = {"node.response/*": "pubsub", "*/a": "pubsub", "*/burst": "pubsub"}

_LETTERS: EventCodec[Any] = EventCodec(max_size=1 << 30)


def redis_backend(kind: str, url: str) -> Backend:
    """The Redis mode `kind` on the server at `url`, with the durability suite's hooks.

    Raw bytes go on the wire names the transport itself uses (its stream key or channel
    prefix; in the mixed transport, those of the topic's mode); dead letters are read back
    from its dead-letter stream, unacknowledged entries from XPENDING.
    """

    def make(**options: Any) -> Transport:
        if kind == "redis-pubsub":
            return RedisPubSubTransport(url, **options)
        if kind == "redis-streams":
            return RedisStreamsTransport(url, **options)
        return RedisTransport(url, mode="streams", topic_modes=MIXED_TOPIC_MODES, **options)

    def limited(limits: Limits) -> Transport:
        if kind == "redis-pubsub":  # at-most-once: no delivery policy
            return make(max_event_size=limits.max_event_size)
        extra: dict[str, Any] = {}
        if limits.abandon_after is not None:
            extra["claim_idle"] = limits.abandon_after
        return make(max_event_size=limits.max_event_size, policy=limits.policy, **extra)

    names = make()  # never connected: the wire names

    def mode_of(topic: str) -> RedisPubSubTransport | RedisStreamsTransport:
        if isinstance(names, RedisTransport):
            mode = names.transport_for(names.router.mode_of(topic))
        else:
            mode = names
        assert isinstance(mode, RedisPubSubTransport | RedisStreamsTransport)
        return mode

    async def inject_raw(topic: str, payload: bytes) -> None:
        mode = mode_of(topic)
        async with aioredis.Redis.from_url(url, protocol=2) as raw:
            if isinstance(mode, RedisStreamsTransport):
                await raw.xadd(mode.stream_key(topic), {b"event": payload})
            else:
                await raw.publish(mode.channel_prefix + wire(topic), payload)

    async def dead_letters(topic: str) -> list[DeadLetter]:
        async with aioredis.Redis.from_url(url, protocol=2) as raw:
            entries = await raw.xrange(mode_of(topic).dead_letter_stream)
        return [
            DeadLetter.from_event(_LETTERS.decode(fields[b"event"]))
            for _, fields in entries
            if fields.get(b"topic") == wire(topic)
        ]

    async def unacked(topic: str, group: str) -> int:
        mode = mode_of(topic)
        assert isinstance(mode, RedisStreamsTransport), f"{topic!r} has no groups"
        async with aioredis.Redis.from_url(url, protocol=2) as raw:
            return int((await raw.xpending(mode.stream_key(topic), group))["pending"])

    return Backend(
        kind,
        make,
        names.capabilities,
        limited=limited,
        inject_raw=inject_raw,
        dead_letters=dead_letters,
        unacked=unacked,
    )


class TestRedisConformance(TransportConformance):
    """Every Redis mode, and both mixed in one transport, pass the suite of every backend."""

    @pytest.fixture(params=["redis-pubsub", "redis-streams", "redis-mixed"])
    def backend(self, request: pytest.FixtureRequest, redis_server: RedisServer) -> Backend:
        """The Redis backend under test, by mode: Pub/Sub (at-most-once, fan-out only),
        Streams (at-least-once, consumer groups), or RedisTransport with topics in both modes
        (declares the weaker capability of each)."""
        return redis_backend(request.param, redis_server.url)
