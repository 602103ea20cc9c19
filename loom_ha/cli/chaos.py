"""`loom-ha chaos`: kill a real broker under load and show that nothing was lost.

Starts a local cluster with the shipped launchers (no Docker), publishes through
`HATransport` while a consumer counts, SIGKILLs a broker mid-run, and prints
sent / received / lost / duplicated / recovery time.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loom_ha.testing.chaos import Broker, ChaosReport, run_chaos


async def run_chaos_command(
    console: Console, *, broker: Broker, events: int, mode: str | None, options: str
) -> int:
    """Run one scenario with a live progress display; returns an exit code."""
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        sent_bar = progress.add_task("sent", total=events, phase="")
        recv_bar = progress.add_task("received", total=events, phase="")

        def update(phase: str, sent: int, received: int) -> None:
            progress.update(sent_bar, completed=sent, phase=phase)
            progress.update(recv_bar, completed=received)

        report = await run_chaos(broker, events=events, mode=mode, options=options, progress=update)
    console.print(render(report))
    durable = report.mode in ("streams", "jetstream")
    return 0 if (report.lost == 0 or not durable) else 1


def render(report: ChaosReport) -> Table:
    """The closing table of a chaos run."""
    table = Table(title=f"loom-ha chaos: {report.broker} ({report.mode}), killed {report.killed}")
    for column in ("sent", "received", "lost", "duplicated", "recovery", "publish errors"):
        table.add_column(column, justify="right")
    recovery = f"{report.recovery_seconds:.2f} s" if report.recovery_seconds is not None else "-"
    table.add_row(
        f"{report.sent:,}",
        f"{report.received:,}",
        f"[{'green' if report.lost == 0 else 'red'}]{report.lost:,}[/]",
        f"{report.duplicated:,}",
        recovery,
        f"{report.publish_errors:,}",
    )
    return table
