"""Publish and delivery spans, and how they link, on the embedded transport (one process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags, TraceState

from loom_ha.event import CloudEvent
from loom_ha.ha.failover import HATransport
from loom_ha.memory import InMemoryTransport
from loom_ha.tracing import render_span_tree, span_records

from ._spans import Spans, parent_of, span_id


@pytest.fixture
async def transport() -> AsyncIterator[HATransport]:
    async with HATransport(InMemoryTransport()) as ha:
        yield ha


def _event(**fields: Any) -> CloudEvent:
    fields.setdefault("data", {"task": "x"})
    return CloudEvent.create("/node/a", "node.request", **fields)


def _traceparent_of(span: Any) -> str:
    ctx = span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


async def test_a_delivery_is_the_child_of_its_publish(spans: Spans, transport: HATransport) -> None:
    """Publish inside a span: the event carries the publish span, the handler's span is its
    child, and all three are one trace."""
    got: asyncio.Queue[Any] = asyncio.Queue()
    await transport.subscribe("node.request/node/b", got.put)
    event = _event()
    with spans.tracer.start_as_current_span("caller"):
        await transport.publish("node.request/node/b", event)
    await got.get()
    finished = await spans.wait_for(3)
    (caller,) = spans.named("caller")
    (publish,) = spans.named("publish node.request/node/b")
    (process,) = spans.named("process node.request/node/b")
    assert len(finished) == 3 and {s.context.trace_id for s in finished} == {
        caller.context.trace_id
    }
    assert parent_of(publish) == span_id(caller)
    assert parent_of(process) == span_id(publish)
    assert event.traceparent == _traceparent_of(publish)
    assert publish.kind is trace.SpanKind.PRODUCER and process.kind is trace.SpanKind.CONSUMER
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == event.id
    assert process.attributes["messaging.destination.name"] == "node.request/node/b"


async def test_a_reply_from_a_handler_continues_the_trace(
    spans: Spans, transport: HATransport
) -> None:
    """What a handler publishes is a child of its delivery span (the handler's current span),
    and the reply's delivery is the child of that publish."""
    replied = asyncio.Event()

    async def serve(event: Any) -> None:
        await transport.publish("node.response/node/b", _event(data={"re": event.id}))

    async def on_reply(event: Any) -> None:
        replied.set()

    await transport.subscribe("node.request/node/b", serve)
    await transport.subscribe("node.response/node/b", on_reply)
    await transport.publish("node.request/node/b", _event())
    async with asyncio.timeout(10):
        await replied.wait()
    await spans.wait_for(4)
    (request_publish,) = spans.named("publish node.request/")
    (request_process,) = spans.named("process node.request/")
    (reply_publish,) = spans.named("publish node.response/")
    (reply_process,) = spans.named("process node.response/")
    assert request_publish.parent is None  # nothing was current: a new trace
    assert parent_of(request_process) == span_id(request_publish)
    assert parent_of(reply_publish) == span_id(request_process)
    assert parent_of(reply_process) == span_id(reply_publish)
    assert len({s.context.trace_id for s in spans.finished()}) == 1


async def test_a_failing_handler_marks_its_delivery_span(
    spans: Spans, transport: HATransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's exception is recorded on its span (status ERROR) and delivery goes on."""
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def fail(event: Any) -> None:
        raise ValueError("bad task")

    await transport.subscribe("t/x", fail)
    await transport.subscribe("t/x", got.put)
    with caplog.at_level(logging.CRITICAL, logger="loom_ha.handlers"):
        await transport.publish("t/x", _event())
        await got.get()
        await spans.wait_for(3)
    failed = [s for s in spans.named("process t/x") if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].status.description == "ValueError: bad task"
    assert [e.name for e in failed[0].events] == ["exception"]
    assert transport.statistics().handler_errors == 1


async def test_a_forwarded_event_continues_the_trace_it_carries(
    spans: Spans, transport: HATransport
) -> None:
    """With no current span, the publish span's parent is the context the event carries."""
    carried = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await transport.publish("t/x", _event(traceparent=carried))
    (publish,) = await spans.wait_for(1)
    assert f"{publish.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert parent_of(publish) == 0xB7AD6B7169203331


async def test_tracestate_travels_and_a_stale_one_is_dropped(
    spans: Spans, transport: HATransport
) -> None:
    """A parent's trace state is written as ``tracestate`` and reaches the handler's span; an
    event published again from a context without one loses the stale value."""
    got: asyncio.Queue[Any] = asyncio.Queue()
    await transport.subscribe("t/x", got.put)
    parent = SpanContext(
        trace_id=0x1234,
        span_id=0x5678,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1")]),
    )
    event = _event()
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        await transport.publish("t/x", event)
    finally:
        otel_context.detach(token)
    assert (await got.get()).model_extra == {"tracestate": "vendor=v1"}
    await transport.publish("t/x", event)  # no current span: parent is the carried context
    with spans.tracer.start_as_current_span("fresh"):
        await transport.publish("t/x", event)
    assert event.model_extra == {}
    await spans.wait_for(7)
    first_process = min(spans.named("process t/x"), key=lambda s: s.start_time or 0)
    assert first_process.context.trace_state.get("vendor") == "v1"


async def test_the_span_tree_renders_parent_and_children(
    spans: Spans, transport: HATransport
) -> None:
    """`render_span_tree` draws one trace with each span under its parent."""
    got: asyncio.Queue[Any] = asyncio.Queue()
    await transport.subscribe("t/x", got.put)
    with spans.tracer.start_as_current_span("caller"):
        await transport.publish("t/x", _event())
    await got.get()
    await spans.wait_for(3)
    lines = render_span_tree(span_records(spans.finished())).splitlines()
    assert lines[0].startswith("trace ")
    assert lines[1].startswith("caller  [client, internal, ")
    assert lines[2].startswith("└── publish t/x  [client, producer, ")
    assert lines[3].startswith("    └── process t/x  [client, consumer, ")
    assert len(lines) == 4
