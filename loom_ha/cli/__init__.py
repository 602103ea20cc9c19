"""The `loom-ha` command: demo, bench, status (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from loom_ha import __version__
from loom_ha._loop import LOOP_CHOICES, LOOP_ENV, choose_loop
from loom_ha.errors import ConfigurationError


class _Version(argparse.Action):
    """`--version`: the package, Python and the event loop the subcommands would run on."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        try:
            loop = choose_loop().description
        except ConfigurationError as exc:
            loop = str(exc)
        print(f"loom-ha {__version__} (Python {platform.python_version()}, event loop: {loop})")
        parser.exit()


def _loop_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        default=None,
        help=f"event loop (default ${LOOP_ENV}, else auto: uvloop when installed)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="loom-ha", description="High-availability messaging for Loom agents."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="show warnings (-v) or info (-vv)"
    )
    parser.add_argument("--version", action=_Version, help="versions and the event loop")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="LoomApp nodes exchanging requests on the embedded default")
    demo.add_argument("--requests", type=int, default=300, help="requests to send (default 300)")
    demo.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    _loop_flag(demo)

    bench = sub.add_parser("bench", help="throughput and latency against a baseline")
    _loop_flag(bench)
    bench.add_argument(
        "--transport",
        choices=["memory", "redis", "nats", "balancing", "discovery", "loom-scale", "all"],
        default="memory",
    )
    bench.add_argument(
        "--url",
        default=None,
        help="broker URL; registry URLs for discovery / loom-scale (default: start servers)",
    )
    bench.add_argument(
        "--ha",
        action="store_true",
        help="(kept for old scripts: every row now has its HATransport and bare-backend figures)",
    )
    bench.add_argument("--events", type=int, default=20_000, help="events per throughput run")
    bench.add_argument("--pings", type=int, default=2_000, help="round trips for latency")
    bench.add_argument(
        "--rounds", type=int, default=5, help="alternating runs of each side; medians shown (5)"
    )
    bench.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="discovery, loom-scale: seconds measured (120)",
    )
    bench.add_argument(
        "--soak",
        action="store_true",
        help="sequential app.run calls: runs/s and RSS, first vs last",
    )
    bench.add_argument("--calls", type=int, default=100_000, help="--soak: HALoomApp calls")
    bench.add_argument(
        "--upstream", type=int, default=2_000, help="--soak: upstream LoomApp calls (0: skip)"
    )
    bench.add_argument("--mode", default=None, help="--soak: delivery mode of a started broker")
    bench.add_argument(
        "--keep-events", action="store_true", help="--soak: Loom's default store (keeps all)"
    )
    bench.add_argument(
        "--processes",
        type=int,
        default=None,
        help="N publisher+consumer processes on one broker: aggregate events/s per mode",
    )
    bench.add_argument(
        "--redis-parser",
        choices=["hiredis", "python"],
        default=None,
        help="redis-py's parser for the whole run, raw clients too (default: hiredis if installed)",
    )
    chaos = sub.add_parser("chaos", help="kill a local broker under load and count every event")
    _loop_flag(chaos)
    chaos.add_argument("--broker", choices=["redis", "nats"], default="redis")
    chaos.add_argument("--events", type=int, default=10_000, help="events to publish (10,000)")
    chaos.add_argument("--mode", default=None, help="transport mode (default: the durable one)")
    chaos.add_argument("--options", default="", help="extra URL options, e.g. outbox=fail_fast")
    status = sub.add_parser("status", help="services, instances and health in a registry")
    status.add_argument(
        "url", nargs="?", help="consul://host:port or redis://host:port/db ($LOOM_HA_REGISTRY)"
    )
    status.add_argument("--service", help="only this service")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per call (5)")
    _loop_flag(status)
    up = sub.add_parser("up", help="start brokers, Consul and app instances as local processes")
    up.add_argument("--stack", choices=["dev", "redis", "nats"], default="nats", help="(nats)")
    up.add_argument("--instances", type=int, default=3, help="app instances to start (3)")
    up.add_argument("--dir", default=".loom-ha", help="state dir: config, data, logs (.loom-ha)")
    up.add_argument("--app", default=None, help="app to run (compose/app/loom_app.py)")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds per instance start (30)")
    down = sub.add_parser("down", help="stop the processes `loom-ha up` started")
    down.add_argument("--dir", default=".loom-ha", help="state dir given to up (.loom-ha)")
    down.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL (10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `loom-ha` console script."""
    args = build_parser().parse_args(argv)
    # Piped output (CI logs, docs) gets room for the tables instead of rich's 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    level = (logging.ERROR, logging.WARNING, logging.INFO)[min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    if args.command == "up":
        from loom_ha.cli.cluster import run_up

        return run_up(
            console,
            stack=args.stack,
            instances=args.instances,
            directory=args.dir,
            app=args.app,
            timeout=args.timeout,
        )
    if args.command == "down":
        from loom_ha.cli.cluster import run_down

        return run_down(console, directory=args.dir, grace=args.grace)
    # Every other subcommand runs an event loop, chosen once here (--loop, $LOOM_HA_LOOP, auto).
    try:
        event_loop = choose_loop(args.loop)
    except ConfigurationError as exc:
        console.print(f"[red]{escape(str(exc))}")
        return 2
    if args.command != "status":  # status prints the registry's table and nothing else
        console.print(f"event loop: {escape(event_loop.description)}", style="dim")
    if args.command == "demo":
        from loom_ha.cli.demo import run_demo

        return event_loop.run(
            run_demo(console, requests=args.requests, concurrency=args.concurrency)
        )
    if args.command == "bench" and args.soak:
        from loom_ha.cli.bench import run_soak

        if args.redis_parser is not None:
            console.print("[red]--redis-parser applies to the bench rows, not to --soak[/]")
            return 2

        return event_loop.run(
            run_soak(
                console,
                transport=args.transport,
                calls=args.calls,
                upstream=args.upstream,
                url=args.url,
                mode=args.mode,
                keep_events=args.keep_events,
            )
        )
    if args.command == "bench":
        from loom_ha.cli.bench import run_bench

        return event_loop.run(
            run_bench(
                console,
                transport=args.transport,
                events=args.events,
                pings=args.pings,
                url=args.url,
                ha=args.ha,
                rounds=args.rounds,
                duration=args.duration,
                processes=args.processes,
                loop=args.loop,
                redis_parser=args.redis_parser,
            )
        )
    if args.command == "chaos":
        from loom_ha.cli.chaos import run_chaos_command

        return event_loop.run(
            run_chaos_command(
                console,
                broker=args.broker,
                events=args.events,
                mode=args.mode,
                options=args.options,
            )
        )
    if args.command == "status":
        from loom_ha.cli.status import run_status

        return event_loop.run(
            run_status(console, args.url, service=args.service, timeout=args.timeout)
        )
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
