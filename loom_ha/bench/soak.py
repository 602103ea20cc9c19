"""The soak benchmark: many sequential `app.run` calls, runs/s and RSS from the first to the last.

loom-agent 0.3.4's `LoomApp.run` leaves a reply handler behind per call, so each reply
reaches every earlier caller and throughput falls quadratically; `HALoomApp` fixes it.
This bench (it needs the `loom` extra) runs one echo node and one app on a single
transport, makes N sequential calls, samples each 1 % window, and compares the first
tenth of the run with the last.

RSS is the current resident set, read from ``/proc/self/statm``: it shows a plateau and
memory given back, while the peak (``getrusage`` maxrss) only ever rises and cannot tell a
plateau from a leak that paused. Where ``/proc`` is missing (macOS) the peak is used and
labelled so. CPU time per call is sampled too: runs/s follow the other processes on the
machine, this process's CPU time much less.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loom.api.main import LoomApp
from loom.node.base import Node
from rich.console import Console
from rich.table import Table

from loom_ha.loom import HALoomApp, loom_transport, start_nodes

WINDOWS = 100
"""Samples per run: one per 1 % of the calls."""
RECENT_EVENTS = 1_000
"""Events the bench's bounded store keeps: as many as Loom's `bus.get_events()` reads."""
_STATM = "/proc/self/statm"


@dataclass(frozen=True)
class Window:
    """One sampling window: its calls, their wall and process CPU time, the RSS at its end."""

    calls: int
    seconds: float
    rss: int  # bytes
    cpu: float  # seconds of this process's CPU (user + system)

    @property
    def runs_per_second(self) -> float:
        """Calls per second in this window."""
        return self.calls / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class SoakReport:
    """What one soak measured: windows and the transport's counters before and after."""

    app: str
    backend: str
    store: str
    calls: int
    windows: tuple[Window, ...]
    rss_start: int
    handlers: tuple[int, int]  # statistics().handlers before the first call, after the last
    subscriptions: tuple[int, int]
    published: int  # during the calls (statistics() difference)
    delivered: int
    seconds: float

    @property
    def tenth(self) -> int:
        """Windows in a tenth of the run (at least one)."""
        return max(1, len(self.windows) // 10)

    def runs_per_second(self, part: Sequence[Window]) -> float:
        """Calls per second over `part` (total calls / total time)."""
        seconds = sum(w.seconds for w in part)
        return sum(w.calls for w in part) / seconds if seconds > 0 else float("inf")

    @property
    def first_runs_per_second(self) -> float:
        """Runs/s over the first 10 % of the calls."""
        return self.runs_per_second(self.windows[: self.tenth])

    @property
    def last_runs_per_second(self) -> float:
        """Runs/s over the last 10 % of the calls."""
        return self.runs_per_second(self.windows[-self.tenth :])

    def cpu_per_call(self, part: Sequence[Window]) -> float:
        """This process's CPU seconds per call over `part`: unlike runs/s, blind to other
        processes taking the cores (the broker's own CPU is not in it)."""
        return sum(w.cpu for w in part) / sum(w.calls for w in part)

    @property
    def first_rss(self) -> float:
        """Median RSS (bytes) at the ends of the first tenth's windows."""
        return statistics.median(w.rss for w in self.windows[: self.tenth])

    @property
    def last_rss(self) -> float:
        """Median RSS (bytes) at the ends of the last tenth's windows."""
        return statistics.median(w.rss for w in self.windows[-self.tenth :])

    def rss_at(self, fraction: float) -> int:
        """RSS (bytes) at the end of the window in which `fraction` of the calls were done."""
        done = 0
        for window in self.windows:
            done += window.calls
            if done >= fraction * self.calls:
                return window.rss
        return self.windows[-1].rss


class RecentEvents:
    """An event store keeping only the latest events (Loom's `EventStore` methods, duck-typed).

    Loom's default `InMemoryEventStore` keeps every event the bus publishes (a request and
    a reply per call, ~2 KiB each): its growth is upstream's design, not a leak in the
    call path, and it would hide one. The bench uses this store unless told to keep all.
    """

    def __init__(self, size: int = RECENT_EVENTS) -> None:
        self._events: deque[Any] = deque(maxlen=size)

    async def append(self, event: Any) -> None:
        """Keep `event`, forgetting the oldest beyond the size."""
        self._events.append(event)

    async def get_events(self, limit: int = 100, offset: int = 0, **filters: Any) -> list[Any]:
        """The kept events matching `filters` (attribute == value), like Loom's store."""
        events = [
            e for e in self._events if all(getattr(e, k, None) == v for k, v in filters.items())
        ]
        return events[offset : offset + limit]


def rss_source() -> str:
    """How `rss_bytes` measures: current RSS, or the peak where /proc is missing."""
    return "current RSS (/proc/self/statm)" if os.path.exists(_STATM) else "peak RSS (getrusage)"


def rss_bytes() -> int:
    """Resident set size of this process now (the peak where /proc is missing)."""
    try:
        with open(_STATM, "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; else KiB


def window_sizes(calls: int, windows: int = WINDOWS) -> list[int]:
    """`calls` cut into up to `windows` consecutive windows of (nearly) equal size."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    bounds = sorted({round(calls * k / windows) for k in range(1, windows + 1)} - {0})
    return [b - a for a, b in zip([0, *bounds], bounds, strict=False)]


class Echo(Node):  # type: ignore[misc]  # loom ships no type information
    """Answers with the task it was given."""

    async def process(self, event: Any) -> Any:
        return event.data["task"]


async def soak(
    url: str, calls: int, *, upstream: bool = False, keep_events: bool = False
) -> SoakReport:
    """Run `calls` sequential `app.run` calls to one echo node on a transport built from `url`.

    Args:
        url: a loom-ha transport URL (``memory://``, ``redis://...?mode=streams``, ...).
        calls: how many calls, one after the other.
        upstream: use loom-agent's own `LoomApp` instead of `HALoomApp`.
        keep_events: keep Loom's default event store (every event) instead of `RecentEvents`.

    Raises:
        RuntimeError: a call returned something other than its own task.
    """
    sizes = window_sizes(calls)
    app_class = LoomApp if upstream else HALoomApp
    # env={}: a LOOM_HA_REGISTRY in the shell must not turn the bench into a routed one.
    transport = loom_transport(url, env={})
    store = None if keep_events else RecentEvents()
    app = app_class(transport=transport, store=store)
    # A unique node: a broker given with --url may keep durable groups of earlier runs.
    target = f"node/soak-{uuid.uuid4().hex[:8]}"
    try:
        await start_nodes(app, Echo(target.removeprefix("node/"), app.dispatcher))
        before = transport.statistics()
        rss_start = rss_bytes()
        windows: list[Window] = []
        done = 0
        started = time.perf_counter()
        for size in sizes:
            window_started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(size):
                task = str(done)
                result = await app.run(task, target=target)
                if result != task:
                    raise RuntimeError(f"call {done} to {target} returned {result!r}, not {task!r}")
                done += 1
            wall, cpu = time.perf_counter() - window_started, time.process_time() - cpu_started
            windows.append(Window(size, wall, rss_bytes(), cpu))
        seconds = time.perf_counter() - started
        after = transport.statistics()
    finally:
        await transport.close()
    return SoakReport(
        app="LoomApp (upstream)" if upstream else "HALoomApp",
        backend=before.backend,
        store="Loom InMemoryEventStore (all)" if keep_events else f"last {RECENT_EVENTS:,}",
        calls=calls,
        windows=tuple(windows),
        rss_start=rss_start,
        handlers=(before.handlers, after.handlers),
        subscriptions=(before.subscriptions, after.subscriptions),
        published=after.published - before.published,
        delivered=after.delivered - before.delivered,
        seconds=seconds,
    )


def _ratio(last: float, first: float) -> str:
    return f"{last / first:.2f}x" if first else "-"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _rows(report: SoakReport) -> list[str]:
    """One column of the table, in the order of `ROW_NAMES`."""
    per_window = [w.runs_per_second for w in report.windows]
    first, last = report.first_runs_per_second, report.last_runs_per_second
    first_rss, last_rss = report.first_rss, report.last_rss
    cpu_first = report.cpu_per_call(report.windows[: report.tenth])
    cpu_last = report.cpu_per_call(report.windows[-report.tenth :])
    return [
        f"{report.calls:,}",
        report.backend,
        report.store,
        f"{first:,.0f}",
        f"{last:,.0f}",
        _ratio(last, first),
        f"{min(per_window):,.0f} - {max(per_window):,.0f}",
        f"{cpu_first * 1e6:,.0f} / {cpu_last * 1e6:,.0f} µs ({_ratio(cpu_last, cpu_first)})",
        _mib(report.rss_start),
        _mib(first_rss),
        _mib(last_rss),
        f"{(last_rss - first_rss) / 2**20:+,.1f} MiB ({_ratio(last_rss, first_rss)})",
        " / ".join(f"{report.rss_at(q) / 2**20:,.1f}" for q in (0.25, 0.5, 0.75, 1.0)) + " MiB",
        f"{report.handlers[0]:,} -> {report.handlers[1]:,}",
        f"{report.subscriptions[0]:,} -> {report.subscriptions[1]:,}",
        f"{report.published:,} / {report.delivered:,}",
        f"{report.seconds:,.1f} s",
    ]


ROW_NAMES = (
    "calls",
    "transport",
    "event store",
    "runs/s, first 10 %",
    "runs/s, last 10 %",
    "runs/s last / first",
    "runs/s per 1 % window (min - max)",
    "CPU per call, first / last 10 %",
    "RSS before the first call",
    "RSS, first 10 % (median)",
    "RSS, last 10 % (median)",
    "RSS last - first",
    "RSS at 25 / 50 / 75 / 100 %",
    "handlers start -> end",
    "subscriptions start -> end",
    "events published / delivered",
    "wall time",
)


def render_soak(console: Console, reports: Sequence[SoakReport], title: str) -> Table:
    """Print the reports side by side (one column each) and return the table."""
    table = Table(title=title)
    table.add_column("figure")
    for report in reports:
        table.add_column(report.app, justify="right")
    columns = [_rows(r) for r in reports]
    for i, name in enumerate(ROW_NAMES):
        table.add_row(name, *(column[i] for column in columns))
    console.print(table)
    console.print(
        f"RSS: {rss_source()} of this process (node and app together), sampled after each 1 % "
        "of the calls; published / delivered: the transport's statistics() during the calls"
    )
    return table
