"""`loom-ha bench`: print loom-ha's figures beside a baseline measured in the same run."""

from __future__ import annotations

import asyncio
import contextlib

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loom_ha.bench.core import BenchRow


def render(console: Console, rows: list[BenchRow], title: str) -> None:
    """Print the rows as a table; a throughput row's CPU per event follows it as a sub-row."""
    table = Table(title=title)
    table.add_column("figure", ratio=2)  # the text columns share what the figures leave
    for column in ("loom-ha", "baseline", "ratio"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("baseline is", ratio=1)
    for row in rows:
        digits = 0 if row.unit == "events/s" else 2
        base = f"{row.baseline:,.{digits}f} {row.unit}" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        if row.spread is not None and row.spread[0] != row.spread[1]:
            ratio += f" ({row.spread[0]:.2f}-{row.spread[1]:.2f})"
        table.add_row(
            row.name, f"{row.ours:,.{digits}f} {row.unit}", base, ratio, row.baseline_name
        )
        if row.cpu is not None and row.cpu_added is not None:
            added, low, high = row.cpu_added
            adds = f"{added:+,.2f} µs" + (f" ({low:+.2f}..{high:+.2f})" if low != high else "")
            table.add_row("  CPU per event", f"{row.cpu[0]:,.2f} µs", f"{row.cpu[1]:,.2f} µs", adds)
    console.print(table)
    console.print(
        "ratio > 1: loom-ha is better (higher throughput or lower latency); figures are medians "
        "of alternating rounds, (low-high) the range of the rounds' ratios. Rows without "
        "'(bare backend)' measure what create_transport(url) builds (HATransport, dedup on). "
        "CPU per event: this process's user+system time while the events flowed (publisher "
        "and subscriber both here); its ratio column is what loom-ha adds (loom-ha minus "
        "baseline), median of the rounds (range)."
    )


async def run_bench(
    console: Console,
    *,
    transport: str,
    events: int,
    pings: int,
    url: str | None = None,
    ha: bool = False,
    rounds: int = 5,
    duration: float = 120.0,
    processes: int | None = None,
    loop: str | None = None,
    redis_parser: str | None = None,
) -> int:
    """Measure and print; returns an exit code.

    Without `url`, Redis and NATS rows run against a server started here from the
    shipped launchers (loopback, temporary directory), stopped afterwards. With
    `processes`, the aggregate rows of `loom_ha.bench.aggregate` (on `loop`, else both).
    `redis_parser` (hiredis, python; None: what is installed) is set for the whole run,
    raw clients included, before redis-py is imported (see `loom_ha.bench.redis_parser`).
    """
    from loom_ha.bench.memory import codec_rows, memory_rows

    if redis_parser is not None and (processes is not None or transport not in ("redis", "all")):
        console.print(
            f"[red]--redis-parser applies to the rows of --transport redis or all, not to "
            f"--transport {transport}{' --processes' if processes is not None else ''}[/]"
        )
        return 2
    if processes is not None:
        from loom_ha.bench.aggregate import run_aggregate

        return await run_aggregate(
            console,
            transport=transport,
            url=url,
            processes=processes,
            events=events,
            rounds=rounds,
            loop=loop,
        )

    if transport == "balancing":
        from loom_ha.bench.balancing import balancing_rows

        rows = await balancing_rows(url, events // 4)
        render(console, rows, "loom-ha bench --transport balancing")
        return 0
    if transport == "discovery":  # registries at scale: URLs of registries, not brokers
        from loom_ha.bench.discovery_scale import render_scale, run_scale

        results = await run_scale(url.split(",") if url else None, duration=duration)
        render_scale(console, results, "loom-ha bench --transport discovery")
        return 0
    if transport == "loom-scale":  # 500 routed Loom nodes; --url: registry URLs, consul, redis
        from loom_ha.bench.loom_scale import render_loom_scale, run_loom_scale

        registries = url.split(",") if url else ("consul", "redis")
        scale = await run_loom_scale(registries, duration=duration, loop=loop)
        render_loom_scale(console, scale, "loom-ha bench --transport loom-scale")
        return 1 if any(r.lost for r in scale) else 0
    if ha:  # kept for old scripts: every row has its HATransport and bare figures now
        console.print("--ha: no longer needed; the '(bare backend)' rows are the HA breakdown")
    wanted = ("memory", "redis", "nats") if transport == "all" else (transport,)
    setup = f"event loop: {_loop_name()}"
    parsers: set[str] = set()
    if "redis" in wanted:
        from loom_ha.bench.redis_parser import use_redis_parser
        from loom_ha.errors import ConfigurationError

        try:
            setup += f", redis parser: {use_redis_parser(redis_parser)}"
        except ConfigurationError as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            return 2
    rows = codec_rows()
    if "memory" in wanted:
        rows += await memory_rows(events, pings, rounds)
    if "redis" in wanted:
        from loom_ha.bench.redis_parser import parsers_used

        with parsers_used() as parsers:
            rows += await _with_server("redis", url, events, pings, rounds)
    if "nats" in wanted:
        rows += await _with_server("nats", url, events, pings, rounds)
    render(console, rows, f"loom-ha bench --transport {transport} ({setup})")
    if parsers:  # what redis-py's connections really got, not what was asked for
        console.print(
            f"redis-py parsers used by this run's connections: {', '.join(sorted(parsers))}"
        )
    return 0


def _loop_name() -> str:
    """The kind of the running event loop, as the table's title names it."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


async def _with_server(
    kind: str, url: str | None, events: int, pings: int, rounds: int
) -> list[BenchRow]:
    """Rows of one broker, on `url` or on a server started for the run; then FastStream's
    rows on the same server when the ``bench`` extra is installed."""
    with contextlib.ExitStack() as servers:
        if kind == "redis":
            from loom_ha.bench.redis import redis_rows
            from loom_ha.testing.redis_servers import RedisServer

            url = url or servers.enter_context(RedisServer()).url
            rows = await redis_rows(url, events, pings, rounds)
        else:
            from loom_ha.bench.nats import nats_rows
            from loom_ha.testing.nats_servers import NatsServer

            url = url or servers.enter_context(NatsServer(jetstream=True)).url
            rows = await nats_rows(url.split(","), events, pings, rounds)
        return rows + await _peer_rows(kind, url.split(",")[0], events, pings, rounds)


async def _peer_rows(kind: str, url: str, events: int, pings: int, rounds: int) -> list[BenchRow]:
    """FastStream doing the same work (`loom_ha.bench.peers`), or nothing without the extra."""
    try:
        from loom_ha.bench.peers import peer_rows

        return await peer_rows(kind, url, events, pings, rounds)
    except ImportError as exc:  # the bench extra is missing: say so, measure the rest
        Console(stderr=True).print(f"FastStream rows skipped: {exc}")
        return []


async def run_soak(
    console: Console,
    *,
    transport: str,
    calls: int,
    upstream: int,
    url: str | None = None,
    mode: str | None = None,
    keep_events: bool = False,
) -> int:
    """`--soak`: HALoomApp over `calls` sequential runs beside upstream's LoomApp over `upstream`.

    Without `url`, a Redis or NATS server is started here (loopback, temporary
    directory) and stopped afterwards; `mode` picks its delivery mode.
    """
    if transport not in ("memory", "redis", "nats"):
        console.print(
            f"[red]--soak runs on one transport (memory, redis, nats), not {transport}[/]"
        )
        return 2
    if calls < 1 or upstream < 0:
        console.print(f"[red]--calls must be >= 1 and --upstream >= 0 (got {calls}, {upstream})[/]")
        return 2
    try:
        from loom_ha.bench.soak import render_soak, soak
    except ImportError:  # pragma: no cover - the loom extra is missing
        console.print("[red]--soak needs loom-agent:[/] pip install 'loom-ha\\[loom]'")
        return 1
    with contextlib.ExitStack() as servers:
        if url is None and transport == "redis":
            from loom_ha.testing.redis_servers import RedisServer

            url = servers.enter_context(RedisServer()).url
        elif url is None and transport == "nats":
            from loom_ha.testing.nats_servers import NatsServer

            url = servers.enter_context(NatsServer(jetstream=True)).url
        url = url or "memory://"
        if mode is not None:
            url += f"{'&' if '?' in url else '?'}mode={mode}"
        # HALoomApp first, on a fresh process: memory an earlier run freed and the
        # allocator kept would otherwise absorb (hide) growth in its first windows.
        reports = [await soak(url, calls, keep_events=keep_events)]
        if upstream:
            reports.append(await soak(url, upstream, upstream=True, keep_events=keep_events))
    render_soak(console, reports, f"loom-ha bench --soak --transport {transport}")
    return 0
