"""Routed requests: one span per attempt, each under the caller's span, a failed attempt marked,
and the attempt that got an answer leading through the instance to the reply."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from opentelemetry.trace import StatusCode

from loom_ha.discovery import MemoryRegistry, MemoryStore
from loom_ha.event import CloudEvent
from loom_ha.ha.failover import HATransport
from loom_ha.memory import InMemoryTransport
from loom_ha.redis import RedisPubSubTransport
from loom_ha.routing import BalancedTransport
from loom_ha.testing.servers import RedisServer
from loom_ha.tracing import render_span_tree

from ._spans import Spans, parent_of, span_id

I = TypeVar("I")  # noqa: E741


class DeadFirst:
    """Chooses the instance named "dead" whenever it may: the first attempt times out."""

    def choose(self, instances: Sequence[I], event: Any = None) -> I:
        return min(instances, key=lambda i: getattr(i, "instance_id", "") != "dead")

    def started(self, instance: Any) -> None:
        pass

    def record(self, instance: Any, latency: float, ok: bool) -> None:
        pass


async def test_each_attempt_is_a_span_under_the_caller(
    spans: Spans, redis_server: RedisServer
) -> None:
    """An instance that never answers costs a failed attempt span; the retry on another
    instance, sent from the attempt timer's task, is still the caller's child and leads to
    the instance's delivery and reply."""
    node = f"node/t{uuid.uuid4().hex[:8]}"
    topic, store = f"node.request/{node}", MemoryStore()
    release = asyncio.Event()
    replies: asyncio.Queue[Any] = asyncio.Queue()

    def routed(name: str, **options: Any) -> BalancedTransport:
        inner = HATransport(RedisPubSubTransport(redis_server.url))
        return BalancedTransport(inner, MemoryRegistry(store), instance_id=name, **options)

    dead, ok = routed("dead"), routed("ok")
    # 1 s: far above one local round trip, so only the silent instance's attempt expires.
    client = routed("client", balancer=DeadFirst(), attempt_timeout=1.0)

    async def hang(event: Any) -> None:
        await release.wait()

    async def answer(event: Any) -> None:
        reply = CloudEvent.create(f"/{node}", "node.response", data={"request_id": event.id})
        await ok.publish(f"node.response/{node}", reply)

    try:
        for transport in (dead, ok, client):
            await transport.connect()
        await dead.subscribe(topic, hang)
        await ok.subscribe(topic, answer)
        await client.subscribe(f"node.response/{node}", replies.put)
        with spans.tracer.start_as_current_span("caller"):
            await client.publish(topic, CloudEvent.create("/caller", "node.request"))
        async with asyncio.timeout(10):
            await replies.get()
        # caller, 2 attempts, 2 request publishes, ok's delivery, its reply's publish, the
        # reply's deliveries to the router and to the test's handler (dead's is still open)
        await spans.wait_for(9)
    finally:
        release.set()
        for transport in (client, ok, dead):
            await transport.close()

    print("\n" + render_span_tree(spans.records()))
    (caller,) = spans.named("caller")
    attempts = sorted(spans.named(f"attempt {topic}"), key=lambda s: s.start_time or 0)
    assert [parent_of(a) for a in attempts] == [span_id(caller)] * 2
    assert [a.attributes["loom_ha.instance_id"] for a in attempts if a.attributes] == [
        "dead",
        "ok",
    ]
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert "no reply" in (attempts[0].status.description or "")
    assert attempts[1].status.status_code is StatusCode.UNSET
    for attempt, instance in zip(attempts, ("dead", "ok"), strict=True):
        (publish,) = spans.named(f"publish {topic}@{instance}")
        assert parent_of(publish) == span_id(attempt)
    (delivered,) = spans.named(f"process {topic}@ok")
    assert parent_of(delivered) == span_id(spans.named(f"publish {topic}@ok")[0])
    (reply,) = spans.named(f"publish node.response/{node}")
    assert parent_of(reply) == span_id(delivered)
    reply_deliveries = spans.named(f"process node.response/{node}")
    assert len(reply_deliveries) == 2
    assert {parent_of(s) for s in reply_deliveries} == {span_id(reply)}
    assert len({s.context.trace_id for s in spans.finished()}) == 1


async def test_an_attempt_carries_its_context_without_a_publish_span(spans: Spans) -> None:
    """Over a bare transport (no HATransport, so no publish span) the request carries the
    attempt's context: the instance's delivery is still the attempt's child."""
    node = f"node/t{uuid.uuid4().hex[:8]}"
    topic, store, shared = f"node.request/{node}", MemoryStore(), InMemoryTransport()
    got: asyncio.Queue[Any] = asyncio.Queue()
    server = BalancedTransport(shared, MemoryRegistry(store), instance_id="srv")
    client = BalancedTransport(shared, MemoryRegistry(store), instance_id="client")
    try:
        await server.connect()
        await client.connect()
        await server.subscribe(topic, got.put)
        await client.publish(topic, CloudEvent.create("/caller", "node.request"))
        async with asyncio.timeout(10):
            await got.get()
        await spans.wait_for(1)
    finally:
        await client.close()
        await server.close()
    (attempt,) = spans.named(f"attempt {topic}")
    (delivered,) = spans.named(f"process {topic}@srv")
    assert attempt.parent is None and not spans.named("publish ")
    assert parent_of(delivered) == span_id(attempt)
