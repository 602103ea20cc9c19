"""Registry scale benchmark: instances per process and per server, heartbeats, shared watches.

``loom-ha bench --transport discovery [--url URL] [--duration S]`` (or ``python -m
loom_ha.bench.discovery_scale``) starts one Consul agent (``-log-level info``, the production
default) and one Redis server on loopback, unless given a registry URL, and for each:

* registers 1,000 instances from one process, then 100 from each of 10 processes
  (registration rate: all instances / wall time, every process starting at once);
* follows one service from 10 watcher processes while this process registers and
  deregisters a probe instance in it once a second (propagation: change -> each watcher's
  snapshot, over every change and watcher);
* over `duration` seconds counts the heartbeat requests the clients really sent (an
  aiohttp trace config on Consul; pipelines and server-side ``SET`` calls on Redis), the
  heartbeat failures, and the CPU of the server and of every client process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from loom_ha.bench.discovery_workers import PROBE, SERVICES
from loom_ha.bench.worker import Child, cpu_seconds
from loom_ha.discovery import ServiceInstance, open_registry

__all__ = ["ScaleResult", "main", "render_scale", "run_scale", "scale_scenario"]

WORKERS = "loom_ha.bench.discovery_workers"  # the module the worker processes run
WATCHERS = 10


@dataclass(frozen=True, kw_only=True)
class ScaleResult:
    """One scenario on one registry."""

    url: str
    processes: int
    instances: int
    register_s: float
    deregister_s: float  # every process closing (deregistering all) at once
    window_s: float
    requests: dict[str, int]  # heartbeat requests (or pipelines) sent in the window, by kind
    server_writes: int | None  # Redis: SET calls the server counted in the window
    failures: int
    passing_at_end: int
    changes: int  # probe registrations and deregistrations the watchers had to see
    change_call_ms: list[float]  # how long each of those calls took (part of propagation)
    propagation_ms: list[float]  # from the start of the change call to each watcher
    server_cpu: float | None  # seconds, in the window
    client_cpu: float  # seconds, every registering process, in the window
    watcher_cpu: float
    watchers: int = WATCHERS
    notes: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        """Heartbeat requests per second, every registering process together."""
        return sum(self.requests.values()) / self.window_s

    def percentile(self, q: float, figures: Sequence[float] | None = None) -> float:
        """Percentile `q` (0-100) of `figures` (default: the propagation), in ms."""
        lat = sorted(self.propagation_ms if figures is None else figures)
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))] if lat else float("nan")

    def lines(self) -> list[str]:
        """Human-readable summary."""
        per = self.instances // self.processes
        server = "-" if self.server_cpu is None else f"{100 * self.server_cpu / self.window_s:.1f}%"
        writes = "" if self.server_writes is None else f", server SETs {self.server_writes}"
        return [
            f"{self.url.split('://')[0]}: {self.processes} process(es) x {per} instances",
            f"  register      {self.instances / self.register_s:8.0f} /s "
            f"({self.instances} in {self.register_s:.2f}s; deregistered on close in "
            f"{self.deregister_s:.2f}s)",
            f"  heartbeat     {self.requests_per_s:8.2f} requests/s {dict(self.requests)}"
            f"{writes}; failures {self.failures}; passing at end "
            f"{self.passing_at_end}/{self.instances}",
            f"  watch         p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms, "
            f"max {max(self.propagation_ms, default=float('nan')):.1f} ms "
            f"({len(self.propagation_ms)} samples, {self.watchers} watchers); the change "
            f"calls themselves p50 {self.percentile(50, self.change_call_ms):.1f} ms, p99 "
            f"{self.percentile(99, self.change_call_ms):.1f} ms",
            f"  cpu           server {server}, clients "
            f"{100 * self.client_cpu / self.window_s:.1f}%, watchers "
            f"{100 * self.watcher_cpu / self.window_s:.1f}% of one core",
            *(f"  note: {n}" for n in self.notes),
        ]


async def scale_scenario(
    url: str,
    *,
    processes: int,
    per_process: int,
    duration: float,
    ttl: float = 10.0,
    watchers: int = WATCHERS,
    server_pid: int | None = None,
    redis_info: Any = None,
) -> ScaleResult:
    """Run one scenario (see the module docstring) against the registry at `url`."""
    prefix = f"scale-{uuid.uuid4().hex[:6]}"
    workers = [
        await Child.start(
            WORKERS, "register", url, prefix, str(per_process), str(n * per_process), str(ttl)
        )
        for n in range(processes)
    ]
    followers: list[Child] = []
    try:
        for worker in workers:
            await worker.expect("started")
        began = time.perf_counter()
        for worker in workers:
            worker.send("register")
        for worker in workers:
            await worker.expect("registered")
        register_s = time.perf_counter() - began
        watched = f"{prefix}-s0"
        followers = [await Child.start(WORKERS, "watch", url, watched) for _ in range(watchers)]
        for watcher in followers:
            await watcher.expect("ready")

        writes_before = _redis_sets(redis_info)
        cpu_before = cpu_seconds(server_pid)
        for worker in workers:
            worker.send("measure")
        start = time.monotonic()
        changes, calls, passing = await _probe(url, watched, prefix, duration, ttl)
        window = time.monotonic() - start
        for worker in workers:
            worker.send("stop")
        reports = [await worker.expect("report") for worker in workers]
        cpu_after = cpu_seconds(server_pid)
        writes_after = _redis_sets(redis_info)
        for watcher in followers:
            watcher.send("stop")
        seen = [await watcher.expect("report") for watcher in followers]
        # Each worker closes (deregisters everything) right after its report.
        closed = [await worker.expect("closed") for worker in workers]
        deregister_s = max(message["seconds"] for message in closed)
    finally:
        for child in (*workers, *followers):
            child.close()
        for child in (*workers, *followers):
            await child.finish()
    requests: Counter[str] = Counter()
    for report in reports:
        requests.update(report["requests"])
    return ScaleResult(
        url=url,
        processes=processes,
        instances=processes * per_process,
        register_s=register_s,
        deregister_s=deregister_s,
        window_s=window,
        requests=dict(requests),
        server_writes=None if writes_before is None else (writes_after or 0) - writes_before,
        failures=sum(r["failures"] for r in reports),
        passing_at_end=passing,
        changes=len(changes),
        change_call_ms=calls,
        propagation_ms=_propagation(changes, [w["seen"] for w in seen]),
        server_cpu=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        client_cpu=sum(r["cpu"] for r in reports),
        watcher_cpu=sum(w["cpu"] for w in seen),
        watchers=watchers,
    )


async def _probe(
    url: str, service: str, prefix: str, duration: float, ttl: float
) -> tuple[list[tuple[float, bool]], list[float], int]:
    """Toggle a probe instance once a second for `duration`.

    Returns (changes: when each began and what it made, each call's ms, passing at the end).
    """
    changes: list[tuple[float, bool]] = []
    calls: list[float] = []
    probe = ServiceInstance(service=service, instance_id=PROBE, address="redis://127.0.0.1:1")
    async with open_registry(url, ttl=ttl) as prober:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while loop.time() - start < duration or n % 2:
            await asyncio.sleep(max(0.0, start + n + 1 - loop.time()))
            when = time.time()  # workers stamp snapshots with the same (wall) clock
            if n % 2 == 0:
                await prober.register(probe)
            else:
                await prober.deregister(probe)
            calls.append((time.time() - when) * 1000)
            changes.append((when, n % 2 == 0))
            n += 1
        await asyncio.sleep(1.0)  # let the slowest watcher (a Redis poll) see the last change
        passing = 0
        for k in range(SERVICES):
            passing += len(await prober.instances(f"{prefix}-s{k}"))
    return changes, calls, passing


def _propagation(changes: list[tuple[float, bool]], seen: list[list[list[Any]]]) -> list[float]:
    """ms from each change to each watcher's first snapshot showing it."""
    delays = []
    for when, present in changes:
        for transitions in seen:
            after = [t for t, p in transitions if p == present and t >= when]
            if after:
                delays.append((after[0] - when) * 1000)
    return delays


def _redis_sets(info: Any) -> int | None:
    if info is None:
        return None
    stats = info("commandstats").get("cmdstat_set", "")
    for part in str(stats).split(","):
        if part.startswith("calls="):
            return int(part[len("calls=") :])
    return 0


async def run_scale(
    urls: Sequence[str] | None = None,
    *,
    duration: float = 120.0,
    instances: int = 1000,
    processes: int = 10,
) -> list[ScaleResult]:
    """Both scenarios on each registry; without `urls`, on a Consul agent and a Redis server
    started here (loopback, temporary directories), stopped afterwards."""
    scenarios = [(1, instances), (processes, instances // processes)]
    results = []
    if urls:
        for url in urls:
            for count, per in scenarios:
                results.append(
                    await scale_scenario(url, processes=count, per_process=per, duration=duration)
                )
        return results
    from loom_ha.testing.servers import ConsulAgent, RedisServer

    with ConsulAgent(log_level="info") as agent, RedisServer() as redis_server:
        targets = [
            (f"consul://{agent.address}", agent.pid, None),
            (redis_server.url, redis_server.pid, redis_server.info),
        ]
        for url, pid, info in targets:
            for count, per in scenarios:
                results.append(
                    await scale_scenario(
                        url,
                        processes=count,
                        per_process=per,
                        duration=duration,
                        server_pid=pid,
                        redis_info=info,
                    )
                )
    return results


def render_scale(console: Console, results: Sequence[ScaleResult], title: str) -> Table:
    """Print one column per scenario and return the table."""
    table = Table(title=title)
    table.add_column("figure")
    for r in results:
        per = r.instances // r.processes
        table.add_column(f"{r.url.split('://')[0]} {r.processes}x{per}", justify="right")

    def pct(seconds: float | None, window: float) -> str:
        return "-" if seconds is None else f"{100 * seconds / window:.1f} %"

    rows = {
        "registration rate": [f"{r.instances / r.register_s:,.0f} /s" for r in results],
        "deregistration (close)": [f"{r.deregister_s:.1f} s" for r in results],
        "heartbeat requests sent": [f"{r.requests_per_s:.2f} /s" for r in results],
        "heartbeat failures": [str(r.failures) for r in results],
        "passing at the end": [f"{r.passing_at_end}/{r.instances}" for r in results],
        "watch propagation p50": [f"{r.percentile(50):.1f} ms" for r in results],
        "watch propagation p99": [f"{r.percentile(99):.1f} ms" for r in results],
        "  of which the change call, p99": [
            f"{r.percentile(99, r.change_call_ms):.1f} ms" for r in results
        ],
        "server CPU": [pct(r.server_cpu, r.window_s) for r in results],
        "clients CPU (registering)": [pct(r.client_cpu, r.window_s) for r in results],
        f"clients CPU ({WATCHERS} watchers)": [pct(r.watcher_cpu, r.window_s) for r in results],
    }
    for name, cells in rows.items():
        table.add_row(name, *cells)
    console.print(table)
    console.print(
        f"over {results[0].window_s:.0f} s each; CPU in % of one core; requests: Consul HTTP "
        "requests counted by the clients, Redis pipelines (one round trip each); watch: "
        f"change -> snapshot in each of {WATCHERS} watcher processes"
    )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark and print each scenario."""
    parser = argparse.ArgumentParser(prog="python -m loom_ha.bench.discovery_scale")
    parser.add_argument("urls", nargs="*", help="registry URLs (default: start Consul + Redis)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds measured (120)")
    parser.add_argument("--instances", type=int, default=1000, help="instances (1000)")
    parser.add_argument("--processes", type=int, default=10, help="second scenario (10)")
    args = parser.parse_args(argv)
    results = asyncio.run(
        run_scale(
            args.urls or None,
            duration=args.duration,
            instances=args.instances,
            processes=args.processes,
        )
    )
    for result in results:
        print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
