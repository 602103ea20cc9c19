"""A traced LoomApp node process (used by test_two_processes.py).

Usage: python traced_node.py URL SPANS_FILE
Configures OpenTelemetry's global tracer provider (the SDK, an in-memory exporter, service
"node"), serves node/echo, prints READY; on SIGTERM closes its transport and writes its
finished spans to SPANS_FILE as JSON (a list of `loom_ha.tracing.SpanRecord` fields).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys
from typing import Any

from loom.api.main import LoomApp
from loom.node.base import Node
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom_ha.loom import loom_transport, start_nodes
from loom_ha.tracing import span_records


async def serve(url: str, spans_file: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "node"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the global provider, as applications set it

    transport = loom_transport(url)
    app = LoomApp(transport=transport)

    class Echo(Node):  # type: ignore[misc]  # loom ships no type information
        async def process(self, event: Any) -> Any:
            return f"echo:{event.data['task']}"

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await start_nodes(app, Echo("echo", app.dispatcher))
        print("READY", flush=True)
        await stop.wait()
    finally:
        await transport.close()
        records = [dataclasses.asdict(r) for r in span_records(exporter.get_finished_spans())]
        provider.shutdown()
        with open(spans_file, "w") as out:  # noqa: ASYNC230 - the loop is done serving
            json.dump(records, out)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
