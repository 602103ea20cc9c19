"""Over every backend and delivery mode, the subscriber's span is the child of the publisher's,
and ``traceparent`` / ``tracestate`` arrive as they were sent."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from loom_ha.config import create_transport
from loom_ha.event import CloudEvent, loom_event_class

from ._spans import Spans, parent_of, span_id


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis-pubsub", marks=pytest.mark.redis),
        pytest.param("redis-streams", marks=pytest.mark.redis),
        pytest.param("nats-core", marks=pytest.mark.nats),
        pytest.param("nats-jetstream", marks=pytest.mark.nats),
    ]
)
def url(request: pytest.FixtureRequest) -> str:
    """A transport URL (wrapped in HATransport, the default) for each backend and mode."""
    if request.param == "memory":
        return "memory://"
    broker, mode = request.param.split("-")
    server = request.getfixturevalue("redis_server" if broker == "redis" else "nats_server")
    return f"{server.url}?mode={mode}"


async def test_trace_context_crosses_the_broker(spans: Spans, url: str) -> None:
    """Publisher and subscriber on their own connections: the delivered event carries the
    publish span's context and the caller's trace state, and its span is the child."""
    topic = f"trace.{uuid.uuid4().hex[:8]}/node/a"
    loom_class = loom_event_class()
    publisher = create_transport(url, event_class=loom_class)
    subscriber = publisher if url == "memory://" else create_transport(url, event_class=loom_class)
    got: asyncio.Queue[Any] = asyncio.Queue()
    caller = SpanContext(
        trace_id=0xABC,
        span_id=0xDEF,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1")]),
    )
    try:
        await subscriber.connect()
        await publisher.connect()
        await subscriber.subscribe(topic, got.put)
        event = CloudEvent.create("/node/a", "node.request", data={"n": 1})
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
        try:
            await publisher.publish(topic, event)
        finally:
            otel_context.detach(token)
        async with asyncio.timeout(10):
            received = await got.get()
        await spans.wait_for(2)
    finally:
        await publisher.close()
        if subscriber is not publisher:
            await subscriber.close()
    (publish,) = spans.named("publish ")
    (process,) = spans.named("process ")
    assert received.traceparent == event.traceparent
    assert received.traceparent.split("-")[1:3] == [
        f"{publish.context.trace_id:032x}",
        f"{publish.context.span_id:016x}",
    ]
    assert (received.model_extra or {}).get("tracestate") == "vendor=v1"
    assert publish.context.trace_id == caller.trace_id and parent_of(publish) == caller.span_id
    assert parent_of(process) == span_id(publish)
    assert process.context.trace_state.get("vendor") == "v1"
