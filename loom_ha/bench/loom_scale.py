"""Routed Loom requests at scale: 500 nodes in 5 processes, called from 2 client processes.

``loom-ha bench --transport loom-scale [--url REGISTRY,...] [--duration S]`` (or ``python -m
loom_ha.bench.loom_scale``) starts a NATS server (core mode: the at-most-once broker, so
"0 lost" is the routing layer's own result) and, unless given registry URLs, a Consul agent
(``-log-level info``) and a Redis server as registries, one after the other. For each:

* 5 node processes each serve the same 100 echo nodes through `HALoomApp` on a
  `BalancedTransport` (100 services x 5 instances = 500 registered Loom nodes); all are
  told to start at once: time until every process subscribed and registered its nodes,
  and until the registry lists all 500 as passing;
* 2 client processes each call one node after another (``app.run``, 32 in flight) through
  their balancer for `duration` seconds, after a warm-up call to every node;
* reported: requests sent / answered / lost, latency p50 / p99, requests/s, how many of
  the 500 nodes answered, retries, and the CPU of the node processes, the clients, the
  broker and the registry server over the window.

Every process started here is stopped on the way out (errors and Ctrl-C included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from rich.console import Console

from loom_ha._loop import LOOP_CHOICES, choose_loop
from loom_ha.bench.loom_scale_report import LoomScaleResult, render_loom_scale
from loom_ha.bench.loom_scale_workers import node_id
from loom_ha.bench.worker import EXIT_TIMEOUT, Child, cpu_seconds
from loom_ha.discovery import open_registry

__all__ = ["LoomScaleResult", "loom_scenario", "main", "render_loom_scale", "run_loom_scale"]

WORKERS = "loom_ha.bench.loom_scale_workers"
NODE_PROCESSES = 5
NODES_PER_PROCESS = 100
CLIENT_PROCESSES = 2
CONCURRENCY = 32  # calls in flight per client process
START_TIMEOUT = 300.0  # s for every node process to subscribe and register on a loaded box
VISIBLE_TIMEOUT = 120.0  # s for the registry to list every instance as passing
REPORT_GRACE = 120.0  # s after the duration for the calls in flight (30 s timeout each) to end
CONSUL_CONNECTIONS = 200  # Consul's default http_max_conns_per_client
STARTED = ("consul", "redis")  # registries started here by default


def agent_connections(node_processes: int, nodes_per_process: int, client_processes: int) -> int:
    """Most HTTP connections the processes of a scenario hold to one Consul agent at once.

    All come from one client IP (loopback), which the agent caps at
    ``http_max_conns_per_client``. With `ConsulRegistry`'s defaults a node process holds 2
    (heartbeat rounds) + 8 (calls); a client 8 + one blocking query per node service it
    calls; the bench's own registry reader 8.
    """
    return node_processes * (2 + 8) + client_processes * (8 + nodes_per_process) + 8


class _Run:
    """The worker processes of one scenario; `stop()` ends every one still running."""

    def __init__(self) -> None:
        self.nodes: list[Child] = []
        self.clients: list[Child] = []

    async def stop(self, *, graceful: bool) -> None:
        """Close every worker, clients first (their calls in flight still get answers);
        kill those not gone within the exit timeout (10 s after an error or Ctrl-C)."""
        timeout = EXIT_TIMEOUT if graceful else 10.0
        for group in (self.clients, self.nodes):
            for child in group:
                child.close()
            for child in group:
                await child.finish(timeout)


async def loom_scenario(
    broker: str,
    registry: str,
    *,
    node_processes: int = NODE_PROCESSES,
    nodes_per_process: int = NODES_PER_PROCESS,
    client_processes: int = CLIENT_PROCESSES,
    concurrency: int = CONCURRENCY,
    duration: float = 120.0,
    balancer: str = "p2c",
    loop: str = "asyncio",
    broker_pid: int | None = None,
    registry_pid: int | None = None,
) -> LoomScaleResult:
    """Run one scenario (see the module docstring) on `broker` with the registry `registry`."""
    prefix = f"ls{uuid.uuid4().hex[:6]}"
    nodes = str(nodes_per_process)
    run = _Run()
    graceful = False
    try:
        for n in range(node_processes):
            node_args = (loop, broker, registry, prefix, nodes, f"p{n}")
            run.nodes.append(await Child.start(WORKERS, "node", *node_args))
        for child in run.nodes:
            await child.expect("started", START_TIMEOUT)
        began = time.perf_counter()
        for child in run.nodes:
            child.send("serve")
        for child in run.nodes:
            await child.expect("ready", START_TIMEOUT)
        registered = time.perf_counter() - began
        visible = await _all_passing(registry, prefix, nodes_per_process, node_processes)
        visible_s = time.perf_counter() - began

        client_args = (
            *(loop, broker, registry, prefix, nodes),
            *(str(concurrency), str(duration), balancer),
        )
        for _ in range(client_processes):
            run.clients.append(await Child.start(WORKERS, "client", *client_args))
        for child in run.clients:
            await child.expect("started", START_TIMEOUT)
            child.send("warm")
        warm = [await child.expect("warm", START_TIMEOUT) for child in run.clients]

        broker_before, registry_before = cpu_seconds(broker_pid), cpu_seconds(registry_pid)
        for child in run.nodes:
            child.send("measure")
        for child in run.clients:
            child.send("go")
        reports = [await c.expect("report", duration + REPORT_GRACE) for c in run.clients]
        broker_after, registry_after = cpu_seconds(broker_pid), cpu_seconds(registry_pid)
        for child in run.nodes:
            child.send("stop")
        served = [await child.expect("report", START_TIMEOUT) for child in run.nodes]
        for child in run.nodes:
            child.close()  # each closes its transport: deregisters all of its nodes
        closed = [await child.expect("closed", START_TIMEOUT) for child in run.nodes]
        graceful = True
    finally:
        await run.stop(graceful=graceful)
    handled = {
        f"p{n}/{node}": count
        for n, report in enumerate(served)
        for node, count in report["handled"].items()
    }
    routing: Counter[str] = Counter()
    for report in reports:
        routing.update(report["routing"])
    errors: Counter[str] = Counter()
    first: dict[str, str] = {}
    for report in reports:
        errors.update(report["errors"])
        for kind, message in report["first_error"].items():
            first.setdefault(kind, message)
    return LoomScaleResult(
        registry=registry,
        node_processes=node_processes,
        nodes_per_process=nodes_per_process,
        client_processes=client_processes,
        concurrency=concurrency,
        balancer=balancer,
        registered_s=registered,
        visible_s=visible_s,
        visible=visible,
        warm={k: sum(w[k] for w in warm) for k in ("sent", "answered", "wrong")},
        sent=sum(r["sent"] for r in reports),
        answered=sum(r["answered"] for r in reports),
        wrong=sum(r["wrong"] for r in reports),
        errors=dict(errors),
        first_error=first,
        latencies_ms=[ms for r in reports for ms in r["latencies_ms"]],
        window_s=max(r["seconds"] for r in reports),
        per_client_rps=[r["answered"] / r["seconds"] for r in reports],
        handled=handled,
        routing=dict(routing),
        node_cpu=[r["cpu"] for r in served],
        client_cpu=[r["cpu"] for r in reports],
        broker_cpu=_delta(broker_before, broker_after),
        registry_cpu=_delta(registry_before, registry_after),
        deregister_s=max(c["seconds"] for c in closed),
        heartbeat_failures=sum(r["heartbeat_failures"] for r in served),
        handler_errors=sum(r["handler_errors"] for r in served),
        notes=[f"{kind}: {message}" for kind, message in first.items()],
    )


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def _all_passing(registry: str, prefix: str, per_process: int, processes: int) -> int:
    """Wait until the registry lists `processes` passing instances of every node; the count.

    Raises:
        TimeoutError: not within `VISIBLE_TIMEOUT` (the message says how many were listed).
    """
    services = [node_id(prefix, n) for n in range(per_process)]
    found: dict[str, int] = {}
    async with open_registry(registry) as reader:
        try:
            async with asyncio.timeout(VISIBLE_TIMEOUT):
                while True:
                    for service in services:
                        if found.get(service, 0) < processes:
                            found[service] = len(await reader.instances(service))
                    if all(found[s] >= processes for s in services):
                        return sum(found.values())
                    await asyncio.sleep(0.1)
        except TimeoutError:
            listed = sum(found.values())
            raise TimeoutError(
                f"{registry.split('://')[0]} listed {listed} of {per_process * processes} "
                f"instances as passing after {VISIBLE_TIMEOUT:g}s"
            ) from None


async def run_loom_scale(
    registries: Sequence[str] = STARTED,
    *,
    broker: str | None = None,
    duration: float = 120.0,
    node_processes: int = NODE_PROCESSES,
    nodes_per_process: int = NODES_PER_PROCESS,
    client_processes: int = CLIENT_PROCESSES,
    concurrency: int = CONCURRENCY,
    balancer: str = "p2c",
    agent_limit: int | None = None,
    loop: str | None = None,
) -> list[LoomScaleResult]:
    """One scenario per registry: a URL, or ``consul`` / ``redis`` for a Consul agent
    (``-log-level info``) / Redis server started here. Without `broker` (a NATS URL) a
    NATS server is started too. What is started here (loopback, temporary directories)
    is stopped afterwards.

    The started agent's ``http_max_conns_per_client`` is `agent_limit`, by default twice
    what `agent_connections` counts (at least Consul's 200): every process here shares one
    client IP. Pass 200 to see Consul's default at work. The workers run on `loop`
    (`choose_loop`: the flag, else ``$LOOM_HA_LOOP``, else uvloop when installed).
    """
    from loom_ha.testing.servers import ConsulAgent, NatsServer, RedisServer

    loop_name = choose_loop(loop).name
    with contextlib.ExitStack() as servers:
        broker_pid = None
        if broker is None:
            nats = servers.enter_context(NatsServer())
            broker, broker_pid = nats.url, nats.pid
        url = f"{broker}{'&' if '?' in broker else '?'}mode=core"
        results = []
        for registry in registries:
            pid = None
            if registry == "consul":
                limit = agent_limit or max(
                    CONSUL_CONNECTIONS,
                    2 * agent_connections(node_processes, nodes_per_process, client_processes),
                )
                conns = f"limits {{ http_max_conns_per_client = {limit} }}"
                agent = servers.enter_context(ConsulAgent(log_level="info", hcl=[conns]))
                registry, pid = f"consul://{agent.address}", agent.pid
            elif registry == "redis":
                redis = servers.enter_context(RedisServer())
                registry, pid = redis.url, redis.pid
            results.append(
                await loom_scenario(
                    url,
                    registry,
                    node_processes=node_processes,
                    nodes_per_process=nodes_per_process,
                    client_processes=client_processes,
                    concurrency=concurrency,
                    duration=duration,
                    balancer=balancer,
                    loop=loop_name,
                    broker_pid=broker_pid,
                    registry_pid=pid,
                )
            )
        return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark and print each scenario; exit 1 if a call was lost."""
    parser = argparse.ArgumentParser(prog="python -m loom_ha.bench.loom_scale")
    parser.add_argument(
        "registries",
        nargs="*",
        default=STARTED,
        help="registry URLs, or consul / redis: started here (default: consul redis)",
    )
    parser.add_argument("--broker", default=None, help="NATS URL (default: start one)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds measured (120)")
    parser.add_argument("--node-processes", type=int, default=NODE_PROCESSES)
    parser.add_argument("--nodes", type=int, default=NODES_PER_PROCESS, help="per process")
    parser.add_argument("--client-processes", type=int, default=CLIENT_PROCESSES)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="per client")
    parser.add_argument("--balancer", default="p2c")
    parser.add_argument("--loop", choices=LOOP_CHOICES, default=None, help="workers' loop")
    parser.add_argument(
        "--agent-limit", type=int, default=None, help="the agent's http_max_conns_per_client"
    )
    args = parser.parse_args(argv)
    results = choose_loop(args.loop).run(
        run_loom_scale(
            args.registries,
            broker=args.broker,
            duration=args.duration,
            node_processes=args.node_processes,
            nodes_per_process=args.nodes,
            client_processes=args.client_processes,
            concurrency=args.concurrency,
            balancer=args.balancer,
            agent_limit=args.agent_limit,
            loop=args.loop,
        )
    )
    render_loom_scale(Console(), results, "python -m loom_ha.bench.loom_scale")
    return 1 if any(r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
