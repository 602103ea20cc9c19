"""Finished spans of an SDK tracer provider with an in-memory exporter, and how to read them."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom_ha.tracing import SpanRecord, span_records


class Spans:
    """The finished spans of this process's provider."""

    def __init__(self, service: str) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def records(self) -> list[SpanRecord]:
        return span_records(self.finished())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name.startswith(prefix)]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[ReadableSpan]:
        """Wait until `count` spans have ended (a span ends after the call it covers)."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.exporter.get_finished_spans()) < count:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        except TimeoutError:
            names = [s.name for s in self.finished()]
            raise AssertionError(f"expected {count} spans, have {names}") from None
        return self.finished()


def parent_of(span: ReadableSpan) -> int | None:
    """The id of `span`'s parent (None for a root)."""
    return int(span.parent.span_id) if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    """The id of `span`."""
    assert span.context is not None
    return int(span.context.span_id)
