"""The durability half of the conformance suite: redelivery, dead letters, persistence, bad input.

The hard parts Watermill's universal suite covers, each gated by a declared capability:

* ``at_least_once``: a failing handler gets the event again until it succeeds (counted in
  `redelivered`), and after the backend's max deliveries the event is dead-lettered with
  why, readable from the durable dead-letter place;
* ``persistent`` + ``competing_consumers``: a group keeps what was published while no member
  was connected;
* ``cross_instance`` (there is a wire): bytes that are no valid CloudEvent, or exceed the
  codec's size limit, are counted in `malformed`, dead-lettered, and delivery goes on.

What only the backend knows (how to put raw bytes on its wire, where its dead letters lie,
what its broker still holds unacknowledged, how to build a transport with a small delivery
budget) comes from optional hooks on `Backend`; a test that needs a missing hook skips and
names it. `TransportConformance` inherits this class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import pytest

from loom_ha.deadletter import DeadLetter
from loom_ha.event import DEFAULT_MAX_SIZE, CloudEvent, EventCodec
from loom_ha.policy import DeliveryPolicy
from loom_ha.testing.backend import Backend, Limits, make_event, publish_numbered, publish_one
from loom_ha.testing.collect import Collector, assert_all_received, publish_markers, without_markers
from loom_ha.transport import Transport

__all__ = ["LIMITS", "DurabilityConformance"]

T = TypeVar("T")

LIMITS = Limits(
    policy=DeliveryPolicy(max_deliveries=3, backoff_initial=0.05, backoff_max=0.2),
    max_event_size=4096,
)
"""What `Backend.limited` is asked for: three attempts 50-200 ms apart, events up to 4 KiB."""

ABANDONING = Limits(
    policy=DeliveryPolicy(max_deliveries=2, backoff_initial=0.05, backoff_max=0.2),
    max_event_size=DEFAULT_MAX_SIZE,
    abandon_after=1.0,
)
"""For the abandoned-event test: two deliveries, each left to another member after 1 s."""

PATIENT = Limits(
    policy=DeliveryPolicy(max_deliveries=20, backoff_initial=0.05, backoff_max=1.0),
    max_event_size=DEFAULT_MAX_SIZE,
)
"""For the redelivery test: quick retries, yet about 15 s of them before a dead letter."""

# Bound of every wait for something that must happen: a hang is the failure, and a loaded
# 2-core CI may take seconds where a laptop takes milliseconds.
WITHIN = 20.0

# Readable back from every dead letter, whatever event class the backend decodes into.
_READER: EventCodec[CloudEvent] = EventCodec(max_size=1 << 30)


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, what: str
) -> T:
    """Poll `probe()` until `done(value)`; returns that value.

    Only for things that must happen (a dead letter being stored, an ack reaching the
    broker) and that no handler sees: it is never used to conclude that something did not.

    Raises:
        AssertionError: `done` never held within `WITHIN` seconds (shows the last value).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while True:
        value = await probe()
        if done(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} within {WITHIN}s; last seen: {value!r}")
        await asyncio.sleep(0.05)


def _same_event(raw: bytes, event: CloudEvent) -> bool:
    return _READER.decode(raw).model_dump() == event.model_dump()


class DurabilityConformance:
    """Durability behaviours, gated by capabilities (needs `backend` and `prefix` fixtures)."""

    async def test_failed_event_is_redelivered_until_handled(
        self, backend: Backend, prefix: str
    ) -> None:
        """An event whose handler fails is delivered again (counted in `redelivered`) until
        the handler succeeds, then acknowledged; the events behind it keep flowing."""
        caps = backend.capabilities
        if not caps.at_least_once:
            pytest.skip(f"{backend.name} lacks at_least_once")
        topic = prefix + "retry"
        group = "workers" if caps.competing_consumers else None
        poison, behind = make_event(0), [make_event(n) for n in range(1, 5)]
        behind_ids = {e.id for e in behind}
        handled = Collector("handled")
        attempts: list[str] = []

        async def flaky(event: Any) -> None:
            if event.id == poison.id:
                attempts.append(event.id)
                # Fails until every later event was handled: were they stuck behind it,
                # it would fail until its attempts are used up (dead-lettered, never handled).
                if len(attempts) == 1 or not behind_ids <= set(handled.ids):
                    raise RuntimeError("not yet (expected by the test)")
            await handled(event)

        limited = backend.limited
        async with AsyncExitStack() as stack:
            # Without the hook the backend's own policy must leave the others time to arrive.
            sub = limited(PATIENT) if limited is not None else backend.factory()
            await stack.enter_async_context(sub)
            pub = await _publisher(stack, backend, sub)
            await sub.subscribe(topic, flaky, group=group)
            for event in (poison, *behind):
                await pub.publish(topic, event)
            await handled.wait_until(
                lambda: poison.id in handled.ids,
                within=WITHIN,
                what=lambda: (
                    f"{len(attempts)} attempts of the failing event, "
                    f"{len(behind_ids & set(handled.ids))} of {len(behind)} events behind it; "
                    f"{sub.statistics()}"
                ),
            )
            if group is not None and backend.unacked is not None:
                unacked = backend.unacked
                await eventually(
                    lambda: unacked(topic, group), lambda n: n == 0, what="every event acked"
                )
            stats = sub.statistics()
        assert len(attempts) >= 2
        if limited is not None:  # the handler never gets more than its budget of attempts
            assert len(attempts) <= PATIENT.policy.max_deliveries, f"{len(attempts)} attempts"
        assert stats.redelivered >= len(attempts) - 1, stats
        assert stats.dead_lettered == 0, stats
        assert_all_received(
            [poison.id, *(e.id for e in behind)],
            handled.ids,
            dedupe=True,
            redelivered=stats.redelivered,
        )

    async def test_redelivery_reaches_only_the_handler_that_failed(
        self, backend: Backend, prefix: str
    ) -> None:
        """Two handlers on one fan-out subscription, one fails once: the event comes again to
        that one only; the handler that succeeded sees it once (progress is kept per
        handler, so at-least-once does not mean "everyone again")."""
        if not backend.capabilities.at_least_once:
            pytest.skip(f"{backend.name} lacks at_least_once")
        topic = prefix + "partial"
        first, trailing = make_event(0), make_event(1)
        steady, flaky_done = Collector("steady"), Collector("flaky")
        attempts: list[str] = []

        async def flaky(event: Any) -> None:
            if event.id == first.id:
                attempts.append(event.id)
                if len(attempts) == 1:
                    raise RuntimeError("first attempt fails (expected by the test)")
            await flaky_done(event)

        limited = backend.limited
        async with AsyncExitStack() as stack:
            sub = limited(PATIENT) if limited is not None else backend.factory()
            await stack.enter_async_context(sub)
            pub = await _publisher(stack, backend, sub)
            await sub.subscribe(topic, steady)
            await sub.subscribe(topic, flaky)
            await pub.publish(topic, first)
            await flaky_done.wait_until(
                lambda: first.id in flaky_done.ids,
                within=WITHIN,
                what=lambda: str(sub.statistics()),
            )
            # Anything the redelivery did to `steady` happened before it reached `flaky`; the
            # trailing event, behind it in order, closes the window for a late copy.
            await pub.publish(topic, trailing)
            await steady.wait_until(
                lambda: trailing.id in steady.ids, within=WITHIN, what=lambda: str(sub.statistics())
            )
            stats = sub.statistics()
        assert attempts == [first.id, first.id], attempts
        assert steady.ids == [first.id, trailing.id], steady.ids
        assert stats.redelivered >= 1 and stats.dead_lettered == 0, stats

    async def test_event_failing_every_attempt_is_dead_lettered(
        self, backend: Backend, prefix: str
    ) -> None:
        """After max deliveries an event whose handler always fails goes to the durable
        dead-letter place with the error, its attempts and its original bytes, and is
        acknowledged; the other events are delivered meanwhile."""
        caps = backend.capabilities
        if not caps.at_least_once:
            pytest.skip(f"{backend.name} lacks at_least_once")
        limited, dead_letters = backend.limited, backend.dead_letters
        if limited is None or dead_letters is None:
            pytest.skip(f"{backend.name} gives no `limited` or `dead_letters` hook")
        topic = prefix + "doomed"
        group = "workers" if caps.competing_consumers else None
        poison, others = make_event(0), [make_event(n) for n in range(1, 4)]
        handled = Collector("handled")
        attempts: list[str] = []

        async def doomed(event: Any) -> None:
            if event.id == poison.id:
                attempts.append(event.id)
                raise ValueError(f"cannot handle {event.id} (expected by the test)")
            await handled(event)

        async with AsyncExitStack() as stack:
            sub = await stack.enter_async_context(limited(LIMITS))
            pub = await _publisher(stack, backend, sub)
            await sub.subscribe(topic, doomed, group=group)
            for event in (poison, *others):
                await pub.publish(topic, event)
            await handled.wait_for(len(others), within=WITHIN)
            letters = await _stored_letters(sub, dead_letters, topic, 1)
            if group is not None and backend.unacked is not None:
                unacked = backend.unacked
                await eventually(
                    lambda: unacked(topic, group), lambda n: n == 0, what="every event acked"
                )
            stats = sub.statistics()
        budget = LIMITS.policy.max_deliveries
        assert attempts == [poison.id] * budget, f"{len(attempts)} attempts, budget {budget}"
        (letter,) = letters
        assert letter.attempts == budget
        assert f"cannot handle {poison.id}" in letter.reason, letter.reason
        assert letter.topic == topic
        assert _same_event(letter.raw, poison), letter.raw
        assert stats.dead_lettered == 1 and stats.redelivered >= budget - 1, stats
        assert_all_received([e.id for e in others], handled.ids)

    async def test_event_every_member_died_on_is_dead_lettered_unhandled(
        self, backend: Backend, prefix: str
    ) -> None:
        """An event whose consumers all died mid-handler (an event that crashes its process)
        goes to another member until its deliveries are used up, then to the dead letters
        without reaching yet another member, with the reason "without an ack"."""
        caps = backend.capabilities
        if not (caps.at_least_once and caps.competing_consumers):
            pytest.skip(f"{backend.name} lacks at_least_once or competing_consumers")
        limited, dead_letters = backend.limited, backend.dead_letters
        if limited is None or dead_letters is None:
            pytest.skip(f"{backend.name} gives no `limited` or `dead_letters` hook")
        topic, group = prefix + "crashing", "workers"
        poison = make_event(0)
        taken: list[int] = []  # which member's handler got it, in order
        arrived = asyncio.Event()

        def dies_on_it(member: int) -> Callable[[Any], Awaitable[None]]:
            async def handler(event: Any) -> None:
                taken.append(member)
                arrived.set()
                await asyncio.Event().wait()  # never returns: its member dies meanwhile

            return handler

        budget = ABANDONING.policy.max_deliveries
        async with AsyncExitStack() as stack:
            members = [limited(ABANDONING) for _ in range(budget + 1)]
            for n, member in enumerate(members):
                await member.connect()
                stack.push_async_callback(member.disconnect)
                await member.subscribe(topic, dies_on_it(n), group=group)
            pub = await _publisher(stack, backend, members[0])
            await pub.publish(topic, poison)
            for _ in range(budget):
                async with asyncio.timeout(WITHIN):
                    await arrived.wait()
                arrived.clear()
                await members[taken[-1]].disconnect()  # it dies while handling the event
            (survivor,) = (m for n, m in enumerate(members) if n not in taken)
            letters = await _stored_letters(survivor, dead_letters, topic, 1)
        assert len(taken) == budget == len(set(taken)), taken
        (letter,) = letters
        assert "without an ack" in letter.reason, letter.reason
        assert letter.attempts == budget, letter
        assert _same_event(letter.raw, poison), letter.raw

    async def test_group_keeps_events_while_no_member_is_connected(
        self, backend: Backend, prefix: str
    ) -> None:
        """Events published while a group has no member connected are delivered to the next
        member that joins the group; what the first member handled does not come again."""
        caps = backend.capabilities
        if not (caps.persistent and caps.competing_consumers and caps.cross_instance):
            pytest.skip(f"{backend.name} lacks persistent, competing_consumers or cross_instance")
        topic, group = prefix + "kept", "keepers"
        first, second = Collector("first member"), Collector("next member")
        async with backend.peers(1) as (pub,):
            member = backend.factory()
            try:
                await member.connect()
                await member.subscribe(topic, first, group=group)
                before = await publish_numbered(pub, topic, 2)
                await first.wait_for(len(before), within=WITHIN)
            finally:
                await member.disconnect()
            meanwhile = await publish_numbered(pub, topic, 5)
            async with backend.factory() as successor:
                await successor.subscribe(topic, second, group=group)
                await second.wait_until(
                    lambda: set(meanwhile) <= set(second.ids),
                    within=WITHIN,
                    what=lambda: (
                        f"next member: {len(set(meanwhile) & set(second.ids))} of "
                        f"{len(meanwhile)} events published while the group had no member"
                    ),
                )
                markers = await publish_markers(pub, topic, second, within=WITHIN)
                redelivered = successor.statistics().redelivered
        received = without_markers(second.ids, markers)
        again = [i for i in received if i in before]
        assert len(again) <= redelivered, f"handled events came again uncounted: {again}"
        assert_all_received(
            meanwhile,
            [i for i in received if i not in before],
            dedupe=caps.at_least_once,
            redelivered=redelivered,
        )

    @pytest.mark.parametrize(
        ("payload", "reason"),
        [
            (b"not json at all \xff", "JSON"),
            (b'{"specversion":"0.3","id":"1","source":"/s","type":"t"}', "specversion"),
        ],
        ids=["not-json", "specversion"],
    )
    async def test_malformed_input_is_dead_lettered_and_skipped(
        self, backend: Backend, prefix: str, payload: bytes, reason: str
    ) -> None:
        """Bytes on the wire that are no valid CloudEvent are counted in `malformed`,
        dead-lettered with the decoder's reason and the bytes as received, and acknowledged;
        the events after them are delivered."""
        _require_wire(backend, "inject_raw", "dead_letters")
        inject, dead_letters = backend.inject_raw, backend.dead_letters
        assert inject is not None and dead_letters is not None
        topic = prefix + "bad"
        group = "workers" if backend.capabilities.competing_consumers else None
        got = Collector()
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(topic, got, group=group)
            await inject(topic, payload)
            # A good event on the same wire after it: once it is here, the bad one was read.
            behind = make_event()
            await inject(topic, _READER.encode(behind))
            await got.wait_for(1, within=WITHIN)
            assert sub.statistics().malformed == 1, sub.statistics()
            sent = await publish_one(pub, topic)
            await got.wait_for(2, within=WITHIN)
            letters = await _stored_letters(sub, dead_letters, topic, 1)
            markers = await publish_markers(pub, topic, got, within=WITHIN)
            if group is not None and backend.unacked is not None:
                unacked = backend.unacked
                await eventually(
                    lambda: unacked(topic, group), lambda n: n == 0, what="the bad input acked"
                )
        assert without_markers(got.ids, markers) == [behind.id, sent]
        (letter,) = letters
        assert letter.raw == payload
        assert reason.lower() in letter.reason.lower(), letter.reason
        assert letter.topic == topic and letter.attempts == 0

    async def test_oversized_event_is_dead_lettered_and_skipped(
        self, backend: Backend, prefix: str
    ) -> None:
        """An event over the subscriber codec's size limit is counted in `malformed` and
        dead-lettered whole, with the reason; the events after it are delivered."""
        _require_wire(backend, "limited", "dead_letters")
        limited, dead_letters = backend.limited, backend.dead_letters
        assert limited is not None and dead_letters is not None
        topic = prefix + "big"
        big = make_event(0, blob="x" * 2 * LIMITS.max_event_size)
        got = Collector()
        async with AsyncExitStack() as stack:
            sub = await stack.enter_async_context(limited(LIMITS))
            pub = await _publisher(stack, backend, sub)  # its codec takes the big event
            await sub.subscribe(topic, got)
            await pub.publish(topic, big)
            sent = await publish_one(pub, topic)
            await got.wait_for(1, within=WITHIN)
            assert sub.statistics().malformed == 1, sub.statistics()
            letters = await _stored_letters(sub, dead_letters, topic, 1)
            markers = await publish_markers(pub, topic, got, within=WITHIN)
        assert without_markers(got.ids, markers) == [sent]
        (letter,) = letters
        assert "limit" in letter.reason, letter.reason
        assert letter.topic == topic and letter.attempts == 0
        assert _same_event(letter.raw, big)


async def _publisher(stack: AsyncExitStack, backend: Backend, sub: Transport) -> Transport:
    """A connected publisher for `sub`: a transport of its own, or `sub` on a single instance."""
    if not backend.capabilities.cross_instance:
        return sub
    return await stack.enter_async_context(backend.factory())


async def _stored_letters(
    sub: Transport,
    dead_letters: Callable[[str], Awaitable[list[DeadLetter]]],
    topic: str,
    count: int,
) -> list[DeadLetter]:
    """The dead letters of `topic`, once `count` are stored and `sub` counted them."""

    async def probe() -> tuple[list[DeadLetter], int]:
        return await dead_letters(topic), sub.statistics().dead_lettered

    letters, _ = await eventually(
        probe,
        lambda found: len(found[0]) >= count and found[1] >= count,
        what=f"{count} dead letter(s) stored and counted",
    )
    return letters


def _require_wire(backend: Backend, *hooks: str) -> None:
    """Skip unless `backend` crosses a process boundary and gives the named hooks."""
    if not backend.capabilities.cross_instance:
        pytest.skip(f"{backend.name} has no wire (lacks cross_instance)")
    missing = [hook for hook in hooks if getattr(backend, hook) is None]
    if missing:
        pytest.skip(f"{backend.name} gives no {' or '.join(f'`{h}`' for h in missing)} hook")
