"""What tracing costs per event: CPU time of publish + delivery through HATransport(memory).

Usage: python tests/tracing/bench_overhead.py [EVENTS]

Each mode runs in a fresh process (whether OpenTelemetry is imported, and which provider is
set, is per process): no OpenTelemetry imported; imported but no provider (OTel's default
no-op); the SDK's TracerProvider without a processor (spans made, then dropped); and with a
SimpleSpanProcessor into an InMemorySpanExporter. Reported: CPU µs per event (publish +
delivery, best of several rounds), and the cost of the two hooks alone while tracing is off.
Run it with PYTHONPATH pointing at another checkout to compare with code without the hooks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import timeit
from typing import Any

MODES = ("no-otel", "otel-no-provider", "sdk-no-processor", "sdk-in-memory")


def _setup(mode: str) -> Any:
    if mode == "no-otel":
        return None
    import opentelemetry.trace as trace

    if mode == "otel-no-provider":
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    if mode == "sdk-in-memory":
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def _per_event_cpu(events: int, rounds: int) -> float:
    """Best CPU µs per event over `rounds` rounds of `events` publishes, each delivered."""
    from loom_ha.event import CloudEvent
    from loom_ha.ha.failover import HATransport
    from loom_ha.memory import InMemoryTransport

    best = float("inf")
    async with HATransport(InMemoryTransport(), dedup=False) as transport:
        received = 0
        done = asyncio.Event()

        async def count(event: Any) -> None:
            nonlocal received
            received += 1
            if received == events:
                done.set()

        await transport.subscribe("bench.trace/x", count)
        for _ in range(rounds):
            batch = [
                CloudEvent(source="/bench", type="bench", data={"n": i}) for i in range(events)
            ]
            received = 0
            done.clear()
            started = time.process_time()
            for event in batch:
                await transport.publish("bench.trace/x", event)
            await done.wait()
            best = min(best, (time.process_time() - started) / events * 1e6)
    return best


def _hooks_off_ns() -> float | None:
    """ns for start_publish + start_delivery while tracing is off (None: no hooks here)."""
    import loom_ha._handlers

    if not hasattr(loom_ha._handlers, "start_delivery"):
        return None  # a checkout without the hooks
    from loom_ha.event import CloudEvent
    from loom_ha.tracing import start_delivery, start_publish

    event = CloudEvent(source="/bench", type="bench")

    def both() -> None:
        start_publish("bench.trace/x", event)
        start_delivery("bench.trace/x", event, print)

    number = 200_000
    timer = timeit.Timer(both, timer=time.process_time)  # CPU time: the machine may be busy
    return min(timer.repeat(repeat=7, number=number)) / number * 1e9


def run_mode(mode: str, events: int) -> dict[str, Any]:
    exporter = _setup(mode)
    cpu = asyncio.run(_per_event_cpu(events, rounds=7))
    spans = len(exporter.get_finished_spans()) if exporter is not None else 0
    hooks = _hooks_off_ns() if mode in ("no-otel", "otel-no-provider") else None
    return {"mode": mode, "cpu_us_per_event": cpu, "hooks_off_ns": hooks, "spans": spans}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--mode":
        print(json.dumps(run_mode(sys.argv[2], int(sys.argv[3]))))
        return
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    print(f"{'mode':<20} {'CPU µs/event':>12} {'hooks off ns':>13} {'spans':>7}")
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--mode", mode, str(events)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        row = json.loads(out)
        hooks = "" if row["hooks_off_ns"] is None else f"{row['hooks_off_ns']:.0f}"
        print(f"{mode:<20} {row['cpu_us_per_event']:>12.2f} {hooks:>13} {row['spans']:>7}")


if __name__ == "__main__":
    main()
