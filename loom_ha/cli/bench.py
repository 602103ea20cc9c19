"""`loom-ha bench`: print loom-ha's figures beside a baseline measured in the same run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from loom_ha.bench.core import BenchRow


def render(console: Console, rows: list[BenchRow], title: str) -> None:
    """Print the rows as a table."""
    table = Table(title=title)
    for column in ("figure", "loom-ha", "baseline", "ratio", "baseline is"):
        table.add_column(column, justify="left" if column in ("figure", "baseline is") else "right")
    for row in rows:
        base = f"{row.baseline:,.2f} {row.unit}" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        table.add_row(row.name, f"{row.ours:,.2f} {row.unit}", base, ratio, row.baseline_name)
    console.print(table)
    console.print("ratio > 1: loom-ha is better (higher throughput or lower latency)")


async def run_bench(console: Console, *, transport: str, events: int, pings: int) -> int:
    """Measure and print; returns an exit code."""
    from loom_ha.bench.memory import codec_rows, memory_rows

    rows = codec_rows()
    if transport == "memory":
        rows += await memory_rows(events, pings)
    render(console, rows, f"loom-ha bench --transport {transport}")
    return 0
