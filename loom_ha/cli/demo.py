"""`loom-ha demo`: a small Loom crew on the embedded default, with per-node figures.

Needs loom-agent (the `loom` extra) and no server: three nodes, one of which calls
the other two, answer concurrent `app.run` requests through `InMemoryTransport`.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from loom_ha.loom import start_nodes
from loom_ha.memory import InMemoryTransport


@dataclass
class NodeFigures:
    """What the demo measured for one target node."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..1) of the latencies, in ms."""
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _make_nodes(app: Any) -> list[Any]:
    from loom.node.base import Node

    class Echo(Node):  # type: ignore[misc]
        async def process(self, event: Any) -> Any:
            return event.data["task"]

    class Upper(Node):  # type: ignore[misc]
        async def process(self, event: Any) -> Any:
            return str(event.data["task"]).upper()

    class Planner(Node):  # type: ignore[misc]
        """Calls echo and upper in parallel: nested node-to-node requests."""

        async def process(self, event: Any) -> Any:
            task = {"task": event.data["task"]}
            echoed, shouted = await asyncio.gather(
                self.call("node/echo", task), self.call("node/upper", task)
            )
            return f"{echoed} / {shouted}"

    return [
        Echo("echo", app.dispatcher),
        Upper("upper", app.dispatcher),
        Planner("planner", app.dispatcher),
    ]


async def run_demo(console: Console, *, requests: int = 300, concurrency: int = 16) -> int:
    """Send `requests` app.run calls to random nodes and print a table; returns an exit code."""
    try:
        from loom_ha.loom import HALoomApp
    except ImportError:
        # "\[" keeps rich from taking [loom] for a style tag (it printed "pip install 'loom-ha'").
        console.print("[red]loom-agent is not installed:[/] pip install 'loom-ha\\[loom]'")
        return 1

    transport = InMemoryTransport()
    app = HALoomApp(transport=transport)
    figures: dict[str, NodeFigures] = {}
    try:
        nodes = _make_nodes(app)
        await start_nodes(app, *nodes)
        targets = [f"node/{n.node_id}" for n in nodes]
        rng = random.Random(7)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            target = rng.choice(targets)
            async with gate:
                started = time.perf_counter()
                try:
                    await app.run(f"task {i}", target=target)
                except Exception:
                    figures.setdefault(target, NodeFigures()).errors += 1
                    return
                elapsed = (time.perf_counter() - started) * 1000
                figures.setdefault(target, NodeFigures()).latencies_ms.append(elapsed)

        started = time.perf_counter()
        with console.status(f"sending {requests} requests to {len(targets)} nodes..."):
            await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
        stats = transport.statistics()
    finally:
        await transport.close()

    table = Table(title=f"loom-ha demo: {requests} requests, {concurrency} in flight, memory")
    for column in ("node", "requests", "errors", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for target in sorted(figures):
        f = figures[target]
        mean = statistics.fmean(f.latencies_ms) if f.latencies_ms else 0.0
        table.add_row(
            target,
            str(len(f.latencies_ms) + f.errors),
            str(f.errors),
            f"{f.percentile(0.5):.2f}",
            f"{f.percentile(0.99):.2f}",
            f"{mean:.2f}",
        )
    console.print(table)
    console.print(
        f"{requests / wall:,.0f} requests/s; transport published {stats.published:,} events, "
        f"delivered {stats.delivered:,}, handler errors {stats.handler_errors}"
    )
    failed = sum(f.errors for f in figures.values())
    return 0 if failed == 0 else 1
