"""What `loom_ha.bench.loom_scale` measured in one scenario, and the table it prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

__all__ = ["LoomScaleResult", "render_loom_scale"]


@dataclass(frozen=True, kw_only=True)
class LoomScaleResult:
    """One scenario: one registry, N node processes, M clients."""

    registry: str
    node_processes: int
    nodes_per_process: int
    client_processes: int
    concurrency: int
    balancer: str
    registered_s: float  # every node process subscribed and registered its nodes
    visible_s: float  # ... and the registry listed every instance as passing
    visible: int
    warm: dict[str, int]  # the warm-up tally, all clients (sent, answered, wrong)
    sent: int
    answered: int
    wrong: int
    errors: dict[str, int]
    first_error: dict[str, str]
    latencies_ms: list[float]
    window_s: float  # the longest client run (duration + its last calls)
    per_client_rps: list[float]
    handled: dict[str, int]  # "<instance>/<node>" -> requests it handled in the window
    routing: dict[str, int]  # the clients' routing counters in the window, summed
    node_cpu: list[float]  # seconds, per node process, in the window
    client_cpu: list[float]
    broker_cpu: float | None
    registry_cpu: float | None
    deregister_s: float
    heartbeat_failures: int = 0  # the node processes' registries, whole run
    handler_errors: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        """Loom nodes served (registered instances expected)."""
        return self.node_processes * self.nodes_per_process

    @property
    def lost(self) -> int:
        """Calls of the window and the warm-up that got no right answer."""
        return self.sent - self.answered + self.warm["sent"] - self.warm["answered"]

    @property
    def rate(self) -> float:
        """Answered requests per second, every client together."""
        return self.answered / self.window_s if self.window_s > 0 else 0.0

    @property
    def answering(self) -> int:
        """Nodes (instance, node pairs) that handled at least one request in the window."""
        return sum(1 for count in self.handled.values() if count > 0)

    def percentile(self, q: float) -> float:
        """Latency percentile `q` (0-100) in ms."""
        lat: list[float] = sorted(self.latencies_ms)
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))] if lat else float("nan")


def render_loom_scale(console: Console, results: Sequence[LoomScaleResult], title: str) -> Table:
    """Print one column per scenario and return the table."""
    table = Table(title=title)
    table.add_column("figure")
    for r in results:
        table.add_column(f"{r.registry.split('://')[0]}", justify="right")

    def pct(seconds: float | None, window: float) -> str:
        return "-" if seconds is None else f"{100 * seconds / window:.1f} %"

    rows = {
        "Loom nodes (processes x nodes)": [
            f"{r.nodes} ({r.node_processes} x {r.nodes_per_process})" for r in results
        ],
        "all subscribed + registered": [f"{r.registered_s:.2f} s" for r in results],
        "all passing in the registry": [
            f"{r.visible}/{r.nodes} in {r.visible_s:.2f} s" for r in results
        ],
        "requests sent (window)": [f"{r.sent:,}" for r in results],
        "answered": [f"{r.answered:,}" for r in results],
        "lost (window + warm-up)": [f"{r.lost} (warm-up: {r.warm['sent']} sent)" for r in results],
        "latency p50": [f"{r.percentile(50):.2f} ms" for r in results],
        "latency p99": [f"{r.percentile(99):.2f} ms" for r in results],
        "latency max": [f"{max(r.latencies_ms, default=0.0):.1f} ms" for r in results],
        "requests/s (all clients)": [f"{r.rate:,.0f}" for r in results],
        "requests/s per client process": [
            " / ".join(f"{x:,.0f}" for x in r.per_client_rps) for r in results
        ],
        "nodes that answered": [f"{r.answering}/{r.nodes}" for r in results],
        "retries / attempt timeouts": [
            f"{r.routing.get('retries', 0)} / {r.routing.get('attempt_timeouts', 0)}"
            for r in results
        ],
        "CPU, node processes (sum)": [pct(sum(r.node_cpu), r.window_s) for r in results],
        "  busiest node process": [pct(max(r.node_cpu), r.window_s) for r in results],
        "CPU, client processes (sum)": [pct(sum(r.client_cpu), r.window_s) for r in results],
        "CPU, broker (nats-server)": [pct(r.broker_cpu, r.window_s) for r in results],
        "CPU, registry server": [pct(r.registry_cpu, r.window_s) for r in results],
        "heartbeat failures (node processes)": [str(r.heartbeat_failures) for r in results],
        "deregistration on close": [f"{r.deregister_s:.2f} s" for r in results],
    }
    for name, cells in rows.items():
        table.add_row(name, *cells)
    console.print(table)
    first = results[0] if results else None
    if first is not None:
        console.print(
            f"over {first.window_s:.0f} s each; {first.client_processes} clients x "
            f"{first.concurrency} calls in flight, balancer {first.balancer}; CPU in % of "
            "one core; lost = calls without the right answer (errors, timeouts, wrong results)"
        )
    for r in results:
        for note in r.notes:
            console.print(f"[red]{r.registry.split('://')[0]}: {note}[/]")
    return table
