"""The transport conformance suite: one set of behaviours every backend must show.

Use it from a test module by subclassing and providing a `backend` fixture::

    from loom_ha.testing.conformance import Backend, TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        def backend(self, my_server) -> Backend:
            return Backend("mine", lambda: MyTransport(my_server.url), MyTransport.capabilities)

What is asserted depends on the declared `Capabilities` (ordering, groups,
duplicates), so a backend is held to exactly what it promises. The durability tests
(redelivery, dead letters, malformed input) also need the backend's optional hooks
(`Backend.limited`, `inject_raw`, `dead_letters`, `unacked`: see `loom_ha.testing.durability`).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from loom_ha.errors import ConfigurationError
from loom_ha.event import CloudEvent
from loom_ha.testing.backend import Backend, Limits, make_event, publish_numbered, publish_one
from loom_ha.testing.collect import (
    Collector,
    assert_all_received,
    collectors,
    distinct_ids,
    publish_markers,
    without_markers,
)
from loom_ha.testing.durability import DurabilityConformance
from loom_ha.testing.lifecycle import LifecycleConformance

__all__ = ["Backend", "Limits", "TransportConformance", "make_event", "publish_numbered"]


class TransportConformance(LifecycleConformance, DurabilityConformance):
    """Behaviours every transport shows; subclass and provide a `backend` fixture.

    The lifecycle half (connect, disconnect, close, cancellation) is in
    `loom_ha.testing.lifecycle`; the durability half (redelivery, dead letters,
    persistence, malformed input; optional `Backend` hooks) in `loom_ha.testing.durability`.
    """

    @pytest.fixture
    def prefix(self) -> str:
        """A topic prefix unique to the test, so tests never see each other's events."""
        return f"conf.{uuid.uuid4().hex[:10]}/"

    async def test_exact_topic_delivers_event_intact(self, backend: Backend, prefix: str) -> None:
        """An event on an exact topic arrives with every attribute unchanged."""
        got = Collector()
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "node/a", got)
            event = CloudEvent.create(
                source="/node/a",
                type="node.response",
                data={"request_id": "r1", "result": {"nested": [1, 2.5, None, "ü"]}},
                subject="node/a",
                traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            event.extensions["timeout"] = 5.0
            event.extensions["nested"] = {"a": [1, {"b": True}]}
            await pub.publish(prefix + "node/a", event)
            (received,) = await got.wait_for(1)
        assert received.model_dump() == event.model_dump()

    @pytest.mark.parametrize(
        ("pattern", "matching", "other"),
        [
            ("evt/*", ["evt/x", "evt/x/y.z", "evt/"], ["evx/x", "other", "ev"]),
            ("*/node/echo", ["node.response/node/echo", "/node/echo"], ["a/node/echo2"]),
            ("node.response/node/a", ["node.response/node/a"], ["node.response/node/ab"]),
        ],
    )
    async def test_wildcards_follow_loom_grammar(
        self, backend: Backend, prefix: str, pattern: str, matching: list[str], other: list[str]
    ) -> None:
        """`prefix*`, `*suffix` and exact patterns match exactly what Loom's grammar says."""
        got = Collector()
        # Keep tests apart: the unique tag goes first, or last for suffix patterns.
        if pattern.startswith("*"):
            tag = prefix[:-1]
            subscribed = pattern + tag
            ok, no = [t + tag for t in matching], [t + tag for t in other]
        else:
            subscribed = prefix + pattern
            ok, no = [prefix + t for t in matching], [prefix + t for t in other]
        witness = Collector("witness")
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(subscribed, got)
            for topic in no:  # brings the other topics to the subscriber: it must filter them
                await sub.subscribe(topic, witness)
            others = [await publish_one(pub, t) for t in no]
            sent = [await publish_one(pub, t) for t in ok]
            await got.wait_for(len(sent))
            await witness.wait_until(
                lambda: set(others) <= set(witness.ids), what=lambda: f"witness: {witness.ids}"
            )
            markers = await publish_markers(pub, ok[-1], got)
        assert_all_received(
            sent, without_markers(got.ids, markers), dedupe=backend.capabilities.at_least_once
        )

    async def test_star_alone_matches_everything(self, backend: Backend, prefix: str) -> None:
        """A subscription to `*` receives events of every topic."""
        mine = Collector()

        async def only_this_test(event: Any) -> None:
            if event.source == "/" + prefix:
                await mine(event)

        async with backend.peers(2) as (sub, pub):
            await sub.subscribe("*", only_this_test)
            sent = []
            for topic in ("a", "b/c.d", "node.request/node/x y"):
                event = make_event(source="/" + prefix)
                await pub.publish(prefix + topic, event)
                sent.append(event.id)
            await mine.wait_for(3)
        assert_all_received(sent, mine.ids, dedupe=backend.capabilities.at_least_once)

    async def test_overlapping_patterns_deliver_once(self, backend: Backend, prefix: str) -> None:
        """A handler on several overlapping patterns receives each event once."""
        got = Collector()
        async with backend.peers(2) as (sub, pub):
            for pattern in (prefix + "*", prefix + "a/*", prefix + "a/b"):
                await sub.subscribe(pattern, got)
            sent = await publish_numbered(pub, prefix + "a/b", 5)
            await got.wait_for(5)
            markers = await publish_markers(pub, prefix + "a/b", got)
            redelivered = sub.statistics().redelivered
        # The marker too arrived once, though three patterns match it.
        assert_all_received(
            [*sent, *markers],
            got.ids,
            dedupe=backend.capabilities.at_least_once,
            redelivered=redelivered,
        )

    async def test_unsubscribe_stops_delivery(self, backend: Backend, prefix: str) -> None:
        """After unsubscribe() the handler gets nothing; unknown pairs are a no-op."""
        gone, stays = Collector("gone"), Collector("stays")
        async with backend.peers(2) as (sub, pub):
            await sub.unsubscribe(prefix + "never", gone)  # unknown: no-op
            await sub.subscribe(prefix + "t", gone)
            await sub.subscribe(prefix + "t", stays)
            await publish_one(pub, prefix + "t")
            await gone.wait_for(1)
            await stays.wait_for(1)
            await sub.unsubscribe(prefix + "t", gone)
            await publish_one(pub, prefix + "t")
            await stays.wait_for(2)
            await publish_markers(pub, prefix + "t", stays)
        assert len(gone.events) == 1

    async def test_handler_errors_are_isolated(self, backend: Backend, prefix: str) -> None:
        """A failing handler is counted and never stops delivery to itself or others."""
        calls, got = collectors("failing", "healthy")

        async def failing(event: Any) -> None:
            await calls(event)
            raise RuntimeError("handler bug (expected by the test)")

        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "t", failing)
            await sub.subscribe(prefix + "t", got)
            sent = await publish_numbered(pub, prefix + "t", 3)
            await got.wait_for(3)
            await calls.wait_for(3)
            assert sub.statistics().handler_errors >= 3
        assert_all_received(sent, got.ids, dedupe=True)

    async def test_sync_handlers_are_called(self, backend: Backend, prefix: str) -> None:
        """Plain (non-async) functions work as handlers."""
        seen: list[str] = []
        arrived = asyncio.Event()

        def plain(event: Any) -> None:
            seen.append(event.id)
            arrived.set()

        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "t", plain)
            sent = await publish_one(pub, prefix + "t")
            async with asyncio.timeout(10):
                await arrived.wait()
        assert seen == [sent]

    async def test_single_publisher_order(self, backend: Backend, prefix: str) -> None:
        """Events of one publisher on one topic arrive in order (when the backend is ordered)."""
        got = Collector()
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "t", got)
            sent = await publish_numbered(pub, prefix + "t", 200)
            await got.wait_for(200)
        assert_all_received(
            sent,
            got.ids,
            ordered=backend.capabilities.ordered,
            dedupe=backend.capabilities.at_least_once,
        )

    async def test_group_members_compete(self, backend: Backend, prefix: str) -> None:
        """Within a group each event reaches one member; a fan-out subscriber gets all."""
        if not backend.capabilities.competing_consumers:
            pytest.skip(f"{backend.name} lacks competing_consumers")
        a, b, watcher = collectors("a", "b", "watcher")
        async with backend.peers(3) as (sub_a, sub_b, pub):
            await sub_a.subscribe(prefix + "jobs", a, group="workers")
            await sub_b.subscribe(prefix + "jobs", b, group="workers")
            await sub_a.subscribe(prefix + "jobs", watcher)
            sent = await publish_numbered(pub, prefix + "jobs", 40)
            await watcher.wait_for(40)
            await a.wait_until(
                lambda: len(distinct_ids(a, b)) >= 40,
                what=lambda: f"group: {len(distinct_ids(a, b))}",
            )
            markers = await publish_markers(pub, prefix + "jobs", a, b, watcher)
            redelivered = sub_a.statistics().redelivered + sub_b.statistics().redelivered
        dedupe = backend.capabilities.at_least_once
        members = without_markers(a.ids + b.ids, markers)
        assert_all_received(sent, members, dedupe=dedupe, redelivered=redelivered)
        assert a.events and b.events, "both members should get a share"
        assert_all_received(sent, without_markers(watcher.ids, markers), dedupe=dedupe)

    async def test_loom_requests_reach_one_instance(self, backend: Backend, prefix: str) -> None:
        """Without a group, `node.request/<node>` subscribers compete (Loom's default rule)."""
        if not backend.capabilities.competing_consumers:
            pytest.skip(f"{backend.name} lacks competing_consumers")
        a, b = collectors("a", "b")
        topic = f"node.request/node/{prefix[:-1]}"
        async with backend.peers(3) as (sub_a, sub_b, pub):
            await sub_a.subscribe(topic, a)
            await sub_b.subscribe(topic, b)
            sent = await publish_numbered(pub, topic, 20)
            await a.wait_until(
                lambda: len(distinct_ids(a, b)) >= 20,
                what=lambda: f"group: {len(distinct_ids(a, b))}",
            )
            markers = await publish_markers(pub, topic, a, b)
            redelivered = sub_a.statistics().redelivered + sub_b.statistics().redelivered
        assert_all_received(
            sent,
            without_markers(a.ids + b.ids, markers),
            dedupe=backend.capabilities.at_least_once,
            redelivered=redelivered,
        )

    @pytest.mark.parametrize(
        "suffix",
        ["with space/x", "dots.in.a.token/x.y", "ünïcødé/日本語/🙂", "node/agent_1", "a//b/"],
    )
    async def test_any_loom_topic_round_trips(
        self, backend: Backend, prefix: str, suffix: str
    ) -> None:
        """Topics with spaces, dots, slashes and unicode work exactly and under a wildcard."""
        exact, wild = Collector("exact"), Collector("wild")
        topic = prefix + suffix
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(topic, exact)
            await sub.subscribe(prefix + "*", wild)
            sent = await publish_one(pub, topic)
            await exact.wait_for(1)
            await wild.wait_for(1)
            markers = await publish_markers(pub, topic, exact, wild)
            redelivered = sub.statistics().redelivered
        # At-most-once: exactly once. At-least-once: never absent, never unexpected, and
        # every extra arrival a redelivery the transport counted.
        for got in (exact, wild):
            assert_all_received(
                [sent],
                without_markers(got.ids, markers),
                dedupe=backend.capabilities.at_least_once,
                redelivered=redelivered,
            )

    async def test_burst_of_10k_loses_nothing(self, backend: Backend, prefix: str) -> None:
        """10,000 events published back to back all arrive."""
        got = Collector()
        count = 10_000
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "burst", got)
            sent = await publish_numbered(pub, prefix + "burst", count)
            await got.wait_for(count, within=60)
        assert_all_received(sent, got.ids, dedupe=backend.capabilities.at_least_once)

    async def test_publish_many_keeps_order_per_topic(self, backend: Backend, prefix: str) -> None:
        """`publish_many` delivers every event, in order per topic, over several batches."""
        got_a, got_b = collectors("a", "b")
        items = [(prefix + ("pa" if n % 3 else "pb"), make_event(n)) for n in range(1_200)]
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "pa", got_a)
            await sub.subscribe(prefix + "pb", got_b)
            await pub.publish_many(items)
            sent_a = [e.id for t, e in items if t.endswith("pa")]
            sent_b = [e.id for t, e in items if t.endswith("pb")]
            await got_a.wait_for(len(sent_a))
            await got_b.wait_for(len(sent_b))
        ordered, dedupe = backend.capabilities.ordered, backend.capabilities.at_least_once
        assert_all_received(sent_a, got_a.ids, ordered=ordered, dedupe=dedupe)
        assert_all_received(sent_b, got_b.ids, ordered=ordered, dedupe=dedupe)

    async def test_publish_many_stops_at_a_bad_item(self, backend: Backend, prefix: str) -> None:
        """A bad item raises; every item before it was published, none after it."""
        got = Collector()
        before = [(prefix + "m", make_event(n)) for n in range(600)]
        after = [(prefix + "m", make_event(n)) for n in range(600, 610)]
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "m", got)
            with pytest.raises(ConfigurationError, match=r"x\*"):
                await pub.publish_many([*before, (prefix + "x*", make_event()), *after])
            await got.wait_for(len(before))
            markers = await publish_markers(pub, prefix + "m", got)
        sent = [e.id for _, e in before]  # an `after` id would be reported as unexpected
        assert_all_received(
            sent, without_markers(got.ids, markers), dedupe=backend.capabilities.at_least_once
        )

    async def test_invalid_topics_are_rejected(self, backend: Backend, prefix: str) -> None:
        """Bad patterns and bad publish topics fail with ConfigurationError naming them."""
        async with backend.peers(1) as (transport,):
            with pytest.raises(ConfigurationError, match=r"a\*b"):
                await transport.subscribe(prefix + "a*b", Collector())
            with pytest.raises(ConfigurationError):
                await transport.publish(prefix + "x*", make_event())
            with pytest.raises(ConfigurationError):
                await transport.publish("", make_event())
