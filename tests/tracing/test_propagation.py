"""Trace context in the CloudEvents distributed-tracing extension survives every codec path,
and loom-ha adds nothing to events, and imports no OpenTelemetry, while tracing is off."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from loom.protocol.cloudevents import CloudEvent as LoomEvent
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from loom_ha.deadletter import DEAD_LETTER_CODEC, DeadLetter
from loom_ha.event import CloudEvent, EventCodec

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def _traced(cls: type[Any]) -> Any:
    event = cls.create("/node/a", "node.request", data={"task": "x"}, traceparent=TRACEPARENT)
    event.tracestate = TRACESTATE
    return event


def _context(event: Any) -> tuple[Any, Any]:
    return event.traceparent, (event.model_extra or {}).get("tracestate")


@pytest.mark.parametrize("cls", [CloudEvent, LoomEvent], ids=["loom_ha", "loom"])
def test_trace_context_survives_encode_and_decode(cls: type[Any]) -> None:
    """traceparent and tracestate come back from the wire, into our class and Loom's alike."""
    for decoded_as in (CloudEvent, LoomEvent):
        back = EventCodec(decoded_as).decode(EventCodec(cls).encode(_traced(cls)))
        assert type(back) is decoded_as
        assert _context(back) == (TRACEPARENT, TRACESTATE)


def test_trace_context_is_the_cloudevents_distributed_tracing_extension() -> None:
    """On the wire both are top-level extension attributes, as the official SDK reads them,
    and what the W3C propagator extracts from them is the context that was sent."""
    wire = EventCodec(CloudEvent).encode(_traced(CloudEvent))
    parsed = JSONFormat().read(None, wire)
    assert parsed.get_extension("traceparent") == TRACEPARENT
    assert parsed.get_extension("tracestate") == TRACESTATE
    carrier = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    extracted = TraceContextTextMapPropagator().extract(carrier)
    sent = trace.get_current_span(extracted).get_span_context()
    assert f"{sent.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert sent.trace_state.to_header() == TRACESTATE


def test_upstream_loom_json_keeps_trace_context() -> None:
    """An event an upstream Loom transport wrote (``model_dump_json``) decodes with both."""
    upstream = _traced(LoomEvent).model_dump_json()
    assert _context(EventCodec(LoomEvent).decode(upstream)) == (TRACEPARENT, TRACESTATE)


def test_a_dead_letter_keeps_trace_context() -> None:
    """A dead letter's original event still carries the trace it belonged to."""
    codec = EventCodec(LoomEvent)
    raw = codec.encode(_traced(LoomEvent))
    letter = DeadLetter(reason="boom", topic="a/b", origin="test", attempts=3, raw=raw)
    wire = DEAD_LETTER_CODEC.encode(letter.to_event())
    back = DeadLetter.from_event(DEAD_LETTER_CODEC.decode(wire))
    assert _context(back.original(codec)) == (TRACEPARENT, TRACESTATE)


def _run(script: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


ROUND_TRIP = """
    import asyncio, json, sys
    {prelude}
    from loom_ha.event import CloudEvent, EventCodec
    from loom_ha.ha.failover import HATransport
    from loom_ha.memory import InMemoryTransport

    async def main():
        got = asyncio.Queue()
        async with HATransport(InMemoryTransport()) as transport:
            await transport.subscribe("a/b", got.put)
            plain = CloudEvent.create("/s", "t", data=1)
            before = EventCodec().encode(plain)
            await transport.publish("a/b", plain)
            await got.get()
            carried = CloudEvent.create("/s", "t", traceparent={traceparent!r})
            await transport.publish("a/b", carried)
            received = await got.get()
        return {{
            "traceparent": plain.traceparent,
            "extra": plain.model_extra,
            "carried": received.traceparent,
            "carried_extra": received.model_extra,
            "same_bytes": before == EventCodec().encode(plain),
            "otel_loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry.")),
        }}

    print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.parametrize(
    "prelude",
    [
        pytest.param("", id="otel-not-imported"),
        pytest.param("import opentelemetry.trace", id="otel-imported-no-provider"),
        pytest.param(
            "from opentelemetry.trace import NoOpTracerProvider, set_tracer_provider\n"
            "    set_tracer_provider(NoOpTracerProvider())",
            id="noop-provider",
        ),
    ],
)
def test_without_a_tracer_provider_events_are_untouched(prelude: str) -> None:
    """No provider configured (a fresh process): a publish and delivery add no trace context,
    leave a carried traceparent alone, and import no OpenTelemetry module of their own."""
    result = _run(ROUND_TRIP.format(prelude=prelude, traceparent=TRACEPARENT))
    assert result["traceparent"] is None and result["extra"] == {}
    assert result["carried"] == TRACEPARENT and result["carried_extra"] == {}
    assert result["same_bytes"]
    if not prelude:
        assert result["otel_loaded"] == []


def test_loom_ha_runs_without_opentelemetry_installed() -> None:
    """With OpenTelemetry absent (imports fail), events flow and tracing stays off."""
    blocked = "sys.modules['opentelemetry'] = None  # any opentelemetry import now fails"
    result = _run(ROUND_TRIP.format(prelude=blocked, traceparent=TRACEPARENT))
    assert result["traceparent"] is None and result["carried"] == TRACEPARENT


LATE_PROVIDER = """
    import asyncio, json
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from loom_ha.event import CloudEvent
    from loom_ha.ha.failover import HATransport
    from loom_ha.memory import InMemoryTransport

    async def main():
        got = asyncio.Queue()
        async with HATransport(InMemoryTransport()) as transport:
            await transport.subscribe("a/b", got.put)
            before = CloudEvent.create("/s", "t")
            await transport.publish("a/b", before)
            await got.get()
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            after = CloudEvent.create("/s", "t")
            await transport.publish("a/b", after)
            await got.get()
        return {
            "before": before.traceparent,
            "after": after.traceparent,
            "spans": sorted(s.name for s in exporter.get_finished_spans()),
        }

    print(json.dumps(asyncio.run(main())))
"""


def test_a_global_provider_set_later_is_followed() -> None:
    """Events flow untraced until the application sets the global provider; the next
    publish and delivery are traced (a fresh process: the global can be set only once)."""
    result = _run(LATE_PROVIDER)
    assert result["before"] is None
    assert result["after"] is not None and result["after"].startswith("00-")
    assert result["spans"] == ["process a/b", "publish a/b"]
