"""JetStream-only behaviour: dedup, nak + dead letters, malformed input, history, recreation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from loom_ha.deadletter import DeadLetter
from loom_ha.event import CloudEvent, EventCodec
from loom_ha.nats import ConsumerOptions, JetStreamTransport, NatsCoreTransport
from loom_ha.policy import DeliveryPolicy
from loom_ha.testing.collect import Collector
from loom_ha.testing.servers import NatsServer

pytestmark = pytest.mark.nats

FAST = ConsumerOptions(
    heartbeat=0.5,
    pull_expires=5.0,
    policy=DeliveryPolicy(max_deliveries=3, backoff_initial=0.05, backoff_max=0.1),
)


@pytest.fixture
def topic() -> str:
    """A topic no other test uses."""
    return f"js.{uuid.uuid4().hex[:10]}/x y"


@pytest.fixture
async def raw(nats_server: NatsServer) -> AsyncIterator[Any]:
    """A plain nats-py client on the session server."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


def _event(n: int = 0) -> CloudEvent:
    return CloudEvent.create(source="/test/js", type="js.test", data={"n": n})


async def _watch_dead_letters(raw: Any, topic: str) -> Any:
    """A core subscription that sees dead letters of `topic` as they are stored."""
    sub = await raw.subscribe(JetStreamTransport().subjects.dead_letter_subject(topic))
    await raw.flush()
    return sub


async def _next_letter(sub: Any) -> DeadLetter:
    msg = await sub.next_msg(timeout=10)
    await sub.unsubscribe()
    return DeadLetter.from_event(EventCodec().decode(msg.data))


async def test_republished_event_ids_are_delivered_once(
    nats_server: NatsServer, topic: str
) -> None:
    """Publishing the same event twice (a retry) stores and delivers it once."""
    got = Collector()
    async with JetStreamTransport([nats_server.url], consumer=FAST) as js:
        await js.subscribe(topic, got)
        event, other = _event(), _event(1)
        await js.publish(topic, event)
        await js.publish(topic, event)
        await js.publish(topic, other)
        await got.wait_for(2)
        # `other` was published last: once it arrived, a duplicate of `event` would have too
        # (one stream, one consumer, in order).
        await got.wait_until(lambda: other.id in got.ids, what=lambda: f"got {got.ids}")
        assert js.statistics().extra["duplicate_publishes"] == 1  # type: ignore[index]
    assert got.ids == [event.id, other.id]


async def test_failing_handler_is_dead_lettered_with_its_reason(
    nats_server: NatsServer, topic: str, raw: Any
) -> None:
    """A handler failing every attempt gets max_deliveries tries, then the event is dead-lettered
    with the error, and the subscription keeps delivering."""
    attempts: list[str] = []
    good = Collector()

    async def flaky(event: Any) -> None:
        if event.data["n"] == 0:
            attempts.append(event.id)
            raise ValueError("cannot handle n=0 (expected by the test)")
        await good(event)

    letters = await _watch_dead_letters(raw, topic)
    async with JetStreamTransport([nats_server.url], consumer=FAST) as js:
        await js.subscribe(topic, flaky)
        doomed = _event(0)
        await js.publish(topic, doomed)
        await js.publish(topic, _event(1))
        await good.wait_for(1)
        letter = await _next_letter(letters)
        stats = js.statistics()
    assert attempts == [doomed.id] * 3
    assert stats.redelivered == 2 and stats.handler_errors == 3
    assert letter.attempts == 3 and "cannot handle n=0" in letter.reason
    assert letter.topic == topic and EventCodec().decode(letter.raw).id == doomed.id


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json at all", "JSON"),
        (b'{"specversion":"0.3","id":"1","source":"/s","type":"t"}', "specversion"),
        (b"x" * 300, "limit"),
    ],
)
async def test_malformed_messages_are_counted_and_dead_lettered(
    nats_server: NatsServer, topic: str, raw: Any, payload: bytes, reason: str
) -> None:
    """Bytes that are no valid CloudEvent are counted, dead-lettered with why, and skipped."""
    got = Collector()
    codec: EventCodec[CloudEvent] = EventCodec(max_size=256)
    letters = await _watch_dead_letters(raw, topic)
    async with JetStreamTransport([nats_server.url], consumer=FAST, codec=codec) as js:
        await js.subscribe(topic, got)
        await raw.jetstream().publish(js.subjects.subject(topic), payload)
        await js.publish(topic, _event())
        await got.wait_for(1)
        letter = await _next_letter(letters)
        stats = js.statistics()
    assert stats.malformed == 1 and len(got.events) == 1
    assert reason.lower() in letter.reason.lower()
    assert letter.raw == payload  # the original, byte for byte, JSON or not
    assert letter.attempts == 0


async def test_core_malformed_messages_are_counted_and_reported(
    nats_server: NatsServer, topic: str, raw: Any
) -> None:
    """Core mode counts a malformed message and publishes a dead letter for it."""
    got = Collector()
    async with NatsCoreTransport([nats_server.url]) as core:
        letters = await raw.subscribe(core.subjects.dead_letter_subject(topic))
        await raw.flush()
        await core.subscribe(topic, got)
        await raw.publish(core.subjects.subject(topic), b"[1, 2]")
        await core.publish(topic, _event())
        await got.wait_for(1)
        letter = DeadLetter.from_event(EventCodec().decode((await letters.next_msg(5)).data))
        stats = core.statistics()
        await letters.unsubscribe()
    assert stats.malformed == 1 and stats.dead_lettered == 1
    assert letter.topic == topic and letter.raw == b"[1, 2]"


async def test_new_subscribers_see_only_new_events_unless_asked(
    nats_server: NatsServer, topic: str
) -> None:
    """A fan-out subscriber starts at new events; start='all' replays the stream."""
    fresh, replay = Collector("fresh"), Collector("replay")
    async with JetStreamTransport([nats_server.url], consumer=FAST) as js:
        old = _event(0)
        await js.publish(topic, old)
        await js.subscribe(topic, fresh)
        new = _event(1)
        await js.publish(topic, new)
        await fresh.wait_for(1)
    everything = ConsumerOptions(heartbeat=0.5, pull_expires=5.0, start="all")
    async with JetStreamTransport([nats_server.url], consumer=everything) as js:
        await js.subscribe(topic, replay)
        await replay.wait_for(2)
    assert fresh.ids == [new.id]
    assert replay.ids == [old.id, new.id]


async def test_deleted_consumer_is_recreated(nats_server: NatsServer, topic: str, raw: Any) -> None:
    """Deleting a subscription's consumer on the server does not stop delivery."""
    got = Collector()
    async with JetStreamTransport([nats_server.url], consumer=FAST) as js:
        await js.subscribe(topic, got)
        await js.publish(topic, _event(0))
        await got.wait_for(1)
        (name,) = js.statistics().extra["consumers"]  # type: ignore[index]
        await raw.jetstream().delete_consumer(js.stream.name, name)
        after = _event(1)
        await js.publish(topic, after)
        await got.wait_for(2, within=15)
        assert js.statistics().extra["consumers_recreated"] >= 1  # type: ignore[index]
    assert got.ids[-1] == after.id


async def test_a_steady_flow_is_not_taken_for_a_dead_pull(
    nats_server: NatsServer, topic: str
) -> None:
    """Events arriving for longer than the idle window keep the first pull: no re-pull."""
    got = Collector()
    steady = ConsumerOptions(heartbeat=0.2, pull_expires=30.0, batch=1000)  # idle after 1.2 s
    async with JetStreamTransport([nats_server.url], consumer=steady) as js:
        await js.subscribe(topic, got)
        for n in range(60):  # 2.4 s of events, one every 40 ms: never idle, never low
            await js.publish(topic, _event(n))
            await asyncio.sleep(0.04)
        await got.wait_for(60)
        pulls = js.statistics().extra["pulls"]  # type: ignore[index]
    assert pulls == 1


async def test_publish_many_pipelines_and_confirms(nats_server: NatsServer, topic: str) -> None:
    """publish_many stores every event before returning; all are delivered."""
    got = Collector()
    async with JetStreamTransport([nats_server.url], consumer=FAST) as js:
        await js.subscribe(topic, got)
        events = [_event(n) for n in range(500)]
        await js.publish_many((topic, e) for e in events)
        await got.wait_for(500)
    assert sorted(got.ids) == sorted(e.id for e in events)


async def test_consumer_deleted_between_pulls_is_recreated(
    nats_server: NatsServer, topic: str, raw: Any
) -> None:
    """A consumer deleted while no pull waits makes the next pull bounce with 503 (no
    responders); the subscription recreates it instead of re-pulling into 503 forever."""
    release = asyncio.Event()
    got = Collector()

    async def blocking(event: Any) -> None:
        await got(event)
        if event.data["n"] == 0:
            await release.wait()  # no pull is outstanding while this runs (batch=1)

    one_by_one = ConsumerOptions(heartbeat=0.5, pull_expires=5.0, batch=1)
    async with JetStreamTransport([nats_server.url], consumer=one_by_one) as js:
        await js.subscribe(topic, blocking)
        await js.publish(topic, _event(0))
        await got.wait_for(1)
        (name,) = js.statistics().extra["consumers"]  # type: ignore[index]
        await raw.jetstream().delete_consumer(js.stream.name, name)
        release.set()
        after = _event(1)
        await js.publish(topic, after)
        await got.wait_for(2, within=15)
        assert js.statistics().extra["consumers_recreated"] >= 1  # type: ignore[index]
    assert got.ids[-1] == after.id


async def test_resubscribing_while_unsubscribing_keeps_delivering(
    nats_server: NatsServer, topic: str
) -> None:
    """Subscribing a pattern while its last handler is being unsubscribed (Loom does this
    around every call to the same node) gets a consumer that the teardown of the old
    one cannot delete."""
    leaving, staying = Collector("leaving"), Collector("staying")
    async with (
        JetStreamTransport([nats_server.url], consumer=FAST) as sub,
        JetStreamTransport([nats_server.url]) as pub,
    ):
        await sub.subscribe(topic, leaving)
        going = asyncio.create_task(sub.unsubscribe(topic, leaving))
        await asyncio.sleep(0)  # the old consumer is now being stopped and deleted
        await sub.subscribe(topic, staying)
        await going
        event = _event()
        await pub.publish(topic, event)
        await staying.wait_for(1, within=10)
    assert staying.ids == [event.id] and leaving.ids == []


async def test_concurrent_subscribers_of_a_pattern_wait_for_the_consumer(
    nats_server: NatsServer, topic: str
) -> None:
    """A second subscribe() of a pattern whose consumer is still being created returns only
    once it exists: the event published next is not skipped by a consumer created later."""
    first, second = Collector("first"), Collector("second")
    async with JetStreamTransport([nats_server.url], consumer=FAST) as js:
        joining = asyncio.create_task(js.subscribe(topic, first))
        await asyncio.sleep(0)  # the first call is now creating the consumer
        await js.subscribe(topic, second)
        assert joining.done(), "returned before the consumer was created"
        event = _event()
        await js.publish(topic, event)
        await second.wait_for(1, within=10)
        await first.wait_for(1, within=10)
    assert first.ids == second.ids == [event.id]
