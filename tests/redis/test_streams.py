"""RedisStreamsTransport behaviour beyond the conformance suite: retries, dead letters, groups."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from loom_ha.deadletter import DeadLetter
from loom_ha.event import CloudEvent, EventCodec
from loom_ha.policy import DeliveryPolicy
from loom_ha.redis import RedisStreamsTransport
from loom_ha.testing.collect import (
    Collector,
    assert_all_received,
    publish_markers,
    without_markers,
)
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import RedisServer

from ._redis_helpers import eventually, eventually_async, while_frozen

pytestmark = pytest.mark.redis

FAST = DeliveryPolicy(max_deliveries=3, backoff_initial=0.01, backoff_max=0.05)


def _event(n: int = 0) -> CloudEvent:
    return CloudEvent.create(source="/test", type="t", data={"n": n})


async def _dead_letters(raw: aioredis.Redis, stream: str) -> list[DeadLetter]:
    letters = []
    for _, fields in await raw.xrange(stream) or []:
        assert fields is not None
        letters.append(DeadLetter.from_event(EventCodec().decode(fields[b"event"])))
    return letters


@pytest.mark.parametrize("group", [None, "workers"])
async def test_failing_handler_is_retried_then_dead_lettered_with_why(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str, group: str | None
) -> None:
    """A handler that keeps failing gets max_deliveries attempts, then it is dead-lettered."""
    calls: list[str] = []
    dead = tag + "dead"

    async def broken(event: Any) -> None:
        calls.append(event.id)
        raise ValueError("cannot handle this")

    async with RedisStreamsTransport(redis_server.url, policy=FAST, dead_letter_stream=dead) as t:
        await t.subscribe(tag + "x", broken, group=group)
        sent = _event()
        await t.publish(tag + "x", sent)
        await eventually(lambda: t.statistics().dead_lettered >= 1)
        stats = t.statistics()
    assert calls == [sent.id] * 3 and stats.redelivered == 2
    (letter,) = await _dead_letters(raw, dead)
    assert letter.attempts == 3 and "ValueError: cannot handle this" in letter.reason
    assert letter.topic == tag + "x" and letter.original(EventCodec()).id == sent.id
    if group is not None:
        assert (await raw.xpending(f"loom:stream:{tag}x", group))["pending"] == 0


async def test_handler_succeeding_on_retry_is_acked_once(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """A handler that fails once and then succeeds leaves nothing pending and no dead letter."""
    calls: list[str] = []

    async def flaky(event: Any) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            raise RuntimeError("transient")

    async with RedisStreamsTransport(redis_server.url, policy=FAST) as t:
        await t.subscribe(tag + "x", flaky, group="g")
        await t.publish(tag + "x", _event())
        await eventually(lambda: len(calls) == 2 and (t.statistics().extra or {})["in_flight"] == 0)
        assert t.statistics().dead_lettered == 0
    assert (await raw.xpending(f"loom:stream:{tag}x", "g"))["pending"] == 0


async def test_malformed_entries_are_dead_lettered_and_consumption_goes_on(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """An entry that is not a CloudEvent is counted and dead-lettered; the next one arrives."""
    got = Collector()
    dead = tag + "dead"
    async with RedisStreamsTransport(redis_server.url, dead_letter_stream=dead) as t:
        await t.subscribe(tag + "x", got, group="g")
        await raw.xadd(f"loom:stream:{tag}x", {"event": b"\xff\xfe garbage"})
        await raw.xadd(f"loom:stream:{tag}x", {"other": b"field"})
        sent = _event()
        await t.publish(tag + "x", sent)
        await got.wait_for(1)
        await eventually(lambda: t.statistics().dead_lettered >= 2)
        assert t.statistics().malformed == 2
    assert got.ids == [sent.id]
    reasons = [letter.reason for letter in await _dead_letters(raw, dead)]
    assert any("JSON" in r for r in reasons) and any("no 'event' field" in r for r in reasons)


async def test_fan_out_subscribers_do_not_replay_history(
    redis_server: RedisServer, tag: str
) -> None:
    """Events stored before a fan-out or new-group subscription are not delivered to it."""
    fan, grouped = Collector("fan"), Collector("grouped")
    async with RedisStreamsTransport(redis_server.url) as t:
        await t.publish(tag + "x", _event(-1))
        await t.subscribe(tag + "x", fan)
        await t.subscribe(tag + "x", grouped, group="fresh")
        sent = _event(1)
        await t.publish(tag + "x", sent)
        await fan.wait_for(1)
        await grouped.wait_for(1)
        await asyncio.sleep(0.1)
    assert fan.ids == [sent.id] and grouped.ids == [sent.id]


async def test_wildcards_pick_up_streams_created_later(redis_server: RedisServer, tag: str) -> None:
    """A wildcard subscription finds topics first published after it subscribed, missing nothing."""
    fan, grouped = Collector("fan"), Collector("grouped")
    async with RedisStreamsTransport(redis_server.url, discovery_interval=0.2) as t:
        await t.subscribe(tag + "*", fan)
        await t.subscribe("*" + tag[:-1], grouped, group="g")
        sent = []
        for topic in (tag + "new/a", tag + "new/b"):
            event = _event()
            await t.publish(topic, event)
            sent.append(event.id)
        suffixed = _event()
        await t.publish("x/" + tag[:-1], suffixed)
        await fan.wait_for(2)
        await grouped.wait_for(1)
    assert_all_received(sent, fan.ids)
    assert grouped.ids == [suffixed.id]


async def test_lost_group_is_recreated_and_reported(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """When the consumer group vanishes (NOGROUP) it is recreated, counted, and reading resumes.

    The key is deleted while the consumer is blocked in XREADGROUP (block=5 s), which Redis
    answers with "UNBLOCKED the stream key no longer exists": that is the group gone, not
    the master lost; taking it for a lost master dropped every connection in flight and
    re-sent a concurrent publish (the event arrived twice).
    """
    got = Collector()
    async with RedisStreamsTransport(redis_server.url, block=5.0) as t:
        await t.subscribe(tag + "x", got, group="g")
        generation = t.connector.generation
        stream = f"loom:stream:{tag}x"
        await _until_blocked_in(raw, "xreadgroup")
        await raw.delete(stream)
        sent = _event()
        await t.publish(tag + "x", sent)
        await got.wait_for(1)
        markers = await publish_markers(t, tag + "x", got)
        assert (t.statistics().extra or {})["groups_recreated"] == 1
        assert t.connector.generation == generation, "the master was taken for lost"
    assert without_markers(got.ids, markers) == [sent.id]


async def test_streams_are_capped_approximately(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str
) -> None:
    """XADD trims each stream to about `maxlen` entries."""
    async with RedisStreamsTransport(redis_server.url, maxlen=10) as t:
        for n in range(500):
            await t.publish(tag + "x", _event(n))
    assert await raw.xlen(f"loom:stream:{tag}x") < 500
    assert await raw.sismember("loom:streams", f"loom:stream:{tag}x")


@pytest.mark.chaos
async def test_append_without_reply_is_resent_and_counted(server_launcher: ServerLauncher) -> None:
    """An XADD whose reply times out is sent again (at-least-once) and the re-send is counted."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    async with (
        RedisStreamsTransport(server.url) as sub,
        RedisStreamsTransport(server.url, socket_timeout=0.3) as pub,
    ):
        await sub.subscribe("resend/x", got)
        sent = _event()
        await while_frozen(server, pub.publish("resend/x", sent))
        await got.wait_for(2)
        stats = pub.statistics()
    assert stats.extra is not None and stats.extra["resent"] == 1
    assert got.ids == [sent.id, sent.id]  # the duplicate at-least-once allows (and counts)


@pytest.mark.chaos
async def test_pipelined_appends_without_reply_are_resent_and_counted(
    server_launcher: ServerLauncher,
) -> None:
    """A `publish_many` batch whose replies time out is sent again whole, and counted."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    async with (
        RedisStreamsTransport(server.url) as sub,
        RedisStreamsTransport(server.url, socket_timeout=0.3) as pub,
    ):
        await sub.subscribe("resend-many/x", got)
        batch = [_event(n) for n in range(50)]
        await while_frozen(server, pub.publish_many(("resend-many/x", e) for e in batch))
        await got.wait_for(2 * len(batch))
        stats = pub.statistics()
    assert stats.extra is not None and stats.extra["resent"] == len(batch)
    ids = [e.id for e in batch]
    assert got.ids == ids + ids  # the duplicates at-least-once allows (and counts)


async def _until_blocked_in(raw: aioredis.Redis, command: str, within: float = 10.0) -> None:
    """Return once some client of the server is blocked (flag b) in `command`."""
    for _ in range(int(within / 0.01)):
        clients = await raw.client_list()
        if any(c.get("cmd") == command and "b" in c.get("flags", "") for c in clients):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no client blocked in {command} within {within}s")


async def test_entries_read_under_our_name_but_never_acked_are_handled_at_once(
    redis_server: RedisServer,
) -> None:
    """An entry already pending for this consumer name when its reader starts (a reply lost
    with a killed master, whose replica has it pending for us; a restart under the same
    name) is handled at the start, not after `claim_idle`."""
    transport = RedisStreamsTransport(redis_server.url, consumer_name="me", claim_idle=60.0)
    raw = aioredis.Redis.from_url(redis_server.url)
    got = Collector()
    await transport.connect()
    try:
        stream = transport.stream_key("lost/reply")
        await raw.xgroup_create(stream, "workers", id="$", mkstream=True)
        event = _event(7)
        await raw.xadd(stream, {"event": EventCodec(CloudEvent).encode(event)})
        # Read under our name; the reply "never arrived": the entry is pending for "me".
        assert await raw.xreadgroup("workers", "me", {stream: ">"}, count=1)
        await transport.subscribe("lost/reply", got, group="workers")
        # A bound against the old wait (claim_idle, 60 s here), not a measurement.
        await got.wait_for(1, within=20.0)
        assert [e.id for e in got.events] == [event.id]

        async def acknowledged() -> bool:  # after the handler
            return (await raw.xpending(stream, "workers"))["pending"] == 0

        await eventually_async(acknowledged)
    finally:
        await transport.close()
        await raw.aclose()
