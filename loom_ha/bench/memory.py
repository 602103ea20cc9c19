"""Benchmark rows of the embedded default and of the codec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loom_ha.bench.core import (
    LATENCY_P50,
    LATENCY_P99,
    BenchRow,
    compare,
    compared_row,
    latency_of,
    measure_latency,
    measure_throughput,
    throughput_of,
)


def loom_event_factory() -> Callable[[int], Any]:
    from loom_ha.event import loom_event_class

    cls = loom_event_class()

    def make(i: int) -> Any:
        return cls(source="/node/bench", type="bench", data={"n": i, "task": "hello"})

    return make


async def memory_rows(events: int, pings: int, rounds: int = 5) -> list[BenchRow]:
    """loom-ha's InMemoryTransport beside loom-agent's own in-memory transport."""
    from loom_ha.memory import InMemoryTransport

    make_event = loom_event_factory()
    try:
        from loom.infra.transport.memory import InMemoryTransport as LoomMemory
    except ImportError:
        tp = await measure_throughput(InMemoryTransport, make_event, events)
        p50, p99 = await measure_latency(InMemoryTransport, make_event, pings)
        name = "(loom not installed)"
        return [
            BenchRow("memory throughput", "events/s", tp, None, name),
            BenchRow("memory ping-pong p50", "ms", p50, None, name, False),
            BenchRow("memory ping-pong p99", "ms", p99, None, name, False),
        ]

    name = "loom-agent InMemoryTransport"
    results = await compare(
        throughput_of(InMemoryTransport, make_event, events),
        throughput_of(LoomMemory, make_event, events),
        rounds,
    )
    rows = [compared_row("memory throughput", "events/s", results, name)]
    results = await compare(
        latency_of(InMemoryTransport, make_event, pings),
        latency_of(LoomMemory, make_event, pings),
        rounds,
    )
    rows.append(compared_row("memory ping-pong p50", "ms", results, name, **LATENCY_P50))
    rows.append(compared_row("memory ping-pong p99", "ms", results, name, **LATENCY_P99))
    return rows


def codec_rows() -> list[BenchRow]:
    """Encode + validated decode per event, beside pydantic's JSON round trip."""
    from loom_ha.bench.codec import codec_benchmark

    figures = codec_benchmark()
    return [
        BenchRow(
            "codec encode+decode",
            "µs/event",
            figures["ours_total"],
            figures["pydantic_total"],
            "pydantic model_dump_json + model_validate_json",
            False,
        )
    ]
