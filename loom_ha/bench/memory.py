"""Benchmark rows of the embedded default and of the codec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loom_ha.bench.core import BenchRow, Path, latency_rows, throughput_rows


def loom_event_factory() -> Callable[[int], Any]:
    from loom_ha.event import loom_event_class

    cls = loom_event_class()

    def make(i: int) -> Any:
        return cls(source="/node/bench", type="bench", data={"n": i, "task": "hello"})

    return make


async def memory_rows(events: int, pings: int, rounds: int = 5) -> list[BenchRow]:
    """``memory://`` as `create_transport` builds it (and bare) beside loom-agent's own
    in-memory transport (or, without loom-agent, beside the bare one)."""
    from loom_ha.bench.ha import default_path

    make_event = loom_event_factory()
    path = default_path("memory://")
    try:
        from loom.infra.transport.memory import InMemoryTransport as LoomMemory
    except ImportError:
        from loom_ha.memory import InMemoryTransport

        baseline: Callable[[], Any] = InMemoryTransport
        name = "loom-ha InMemoryTransport, bare (loom-agent not installed)"
        path = Path(path.default)  # the baseline is the breakdown already
    else:
        baseline, name = LoomMemory, "loom-agent InMemoryTransport"
    rows = await throughput_rows(
        "memory throughput",
        path,
        baseline,
        name,
        make_event=make_event,
        events=events,
        rounds=rounds,
    )
    rows += await latency_rows(
        "memory ping-pong", path, baseline, name, make_event=make_event, pings=pings, rounds=rounds
    )
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
