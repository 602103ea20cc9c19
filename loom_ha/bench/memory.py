"""Benchmark rows of the embedded default and of the codec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loom_ha.bench.core import BenchRow, measure_latency, measure_throughput


def loom_event_factory() -> Callable[[int], Any]:
    from loom_ha.event import loom_event_class

    cls = loom_event_class()

    def make(i: int) -> Any:
        return cls(source="/node/bench", type="bench", data={"n": i, "task": "hello"})

    return make


async def memory_rows(events: int, pings: int) -> list[BenchRow]:
    """loom-ha's InMemoryTransport beside loom-agent's own in-memory transport."""
    from loom_ha.memory import InMemoryTransport

    make_event = loom_event_factory()
    baseline_factory: Callable[[], Any] | None
    try:
        from loom.infra.transport.memory import InMemoryTransport as LoomMemory

        baseline_factory = LoomMemory
    except ImportError:
        baseline_factory = None
    base_name = "loom-agent InMemoryTransport" if baseline_factory else "(loom not installed)"

    ours_tp = await measure_throughput(InMemoryTransport, make_event, events)
    ours_p50, ours_p99 = await measure_latency(InMemoryTransport, make_event, pings)
    base_tp = base_p50 = base_p99 = None
    if baseline_factory is not None:
        base_tp = await measure_throughput(baseline_factory, make_event, events)
        base_p50, base_p99 = await measure_latency(baseline_factory, make_event, pings)
    return [
        BenchRow("memory throughput", "events/s", ours_tp, base_tp, base_name),
        BenchRow("memory ping-pong p50", "ms", ours_p50, base_p50, base_name, False),
        BenchRow("memory ping-pong p99", "ms", ours_p99, base_p99, base_name, False),
    ]


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
