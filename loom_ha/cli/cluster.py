"""`loom-ha up` / `loom-ha down`: a local cluster without Docker (loom_ha.testing.local_cluster)."""

from __future__ import annotations

import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loom_ha.testing._process import ServerNotReadyError
from loom_ha.testing.cluster_state import (
    STATE_FILE,
    ClusterError,
    ClusterRunningError,
    ClusterState,
    stop_cluster,
)
from loom_ha.testing.local_cluster import start_cluster

__all__ = ["export_line", "render_cluster", "run_down", "run_up"]


def render_cluster(state: ClusterState) -> Table:
    """The table `loom-ha up` prints: every process, its pid, address, ports and log."""
    root = Path(state.dir)
    table = Table(title=f"loom-ha {state.stack} cluster in {root}", title_justify="left")
    for column in ("name", "role", "pid", "address", "ports", "log"):
        table.add_column(column, overflow="fold")
    for proc in state.processes:
        ports = " ".join(f"{k}={v}" for k, v in proc.ports.items())
        log = Path(proc.log)
        shown = log.relative_to(root) if log.is_relative_to(root) else log
        instance_id = proc.env.get("LOOM_HA_INSTANCE_ID")
        address = proc.url or (f"instance id {instance_id}" if instance_id else "")
        table.add_row(proc.name, proc.role, str(proc.pid), address, ports, str(shown))
    return table


def export_line(state: ClusterState) -> str:
    """`export LOOM_TRANSPORT=... LOOM_HA_REGISTRY=...`: what a client needs, shell-quoted."""
    pairs = (f"{name}={shlex.quote(value)}" for name, value in state.client_env.items())
    return "export " + " ".join(pairs)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so a killed `up` still stops what it started."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_up(
    console: Console,
    *,
    stack: str,
    instances: int,
    directory: str,
    app: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Start a local cluster and print what runs where; return the exit code (0 or 1)."""
    root = Path(directory).absolute()

    def step(line: str) -> None:
        console.print(f"[dim]{escape(line)}")

    try:
        with _sigterm_interrupts():
            state = start_cluster(
                stack,
                root,
                instances=instances,
                app=Path(app) if app else None,
                ready_timeout=timeout,
                on_step=step,
            )
    except ClusterRunningError as exc:
        console.print(f"[red]loom-ha up: {escape(str(exc))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print(f"[red]loom-ha up interrupted: everything started was stopped (logs: {root})")
        return 130
    except ClusterError as exc:  # refused before anything started
        console.print(f"[red]loom-ha up: {escape(str(exc))}", soft_wrap=True)
        return 1
    except (ServerNotReadyError, OSError) as exc:
        console.print(f"[red]loom-ha up failed:[/] {escape(str(exc))}", soft_wrap=True)
        if (root / STATE_FILE).exists():
            console.print(
                f"Everything started was stopped; the logs stay in {root} "
                "(`loom-ha down` removes them).",
                markup=False,
                soft_wrap=True,
            )
        return 1
    console.print(render_cluster(state))
    for name, url in state.links.items():
        console.print(f"{name}: {url}", markup=False, highlight=False)
    if stack == "dev":
        console.print(
            "memory:// lives inside one process: dev instances do not reach each other.",
            style="yellow",
        )
    console.print("Clients reach the cluster with:")
    console.print(export_line(state), markup=False, highlight=False, soft_wrap=True)
    console.print(f"Stop it with: loom-ha down --dir {shlex.quote(str(root))}", markup=False)
    return 0


def run_down(console: Console, *, directory: str, grace: float = 10.0) -> int:
    """Stop the cluster recorded in `directory` and remove it; return the exit code."""
    root = Path(directory).absolute()
    try:
        report = stop_cluster(root, grace=grace)
    except ClusterError as exc:
        console.print(f"[red]loom-ha down failed:[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    if report.state is None:
        console.print(f"Nothing running: no {STATE_FILE} in {root}.", markup=False)
        return 0
    stopped = len(report.stopped) + len(report.killed)
    if not stopped:
        console.print(f"Nothing running; removed the stale state dir {root}.", markup=False)
        return 0
    killed = f" ({len(report.killed)} needed SIGKILL)" if report.killed else ""
    console.print(
        f"Stopped {stopped} process(es) of the {report.state.stack} cluster{killed}; "
        f"removed {root}.",
        markup=False,
    )
    return 0
