"""The worker processes of `loom_ha.bench.loom_scale`: one serving Loom nodes, one calling them.

``python -m loom_ha.bench.loom_scale_workers node LOOP BROKER REGISTRY PREFIX NODES INSTANCE``
serves NODES echo nodes (``PREFIX-n000`` ...) as instance INSTANCE of each;
``... client LOOP BROKER REGISTRY PREFIX NODES CONCURRENCY DURATION BALANCER`` calls them
with CONCURRENCY calls in flight; LOOP is asyncio or uvloop. Both build what a user
builds: `HALoomApp` on a `BalancedTransport` over `loom_transport(BROKER)` (HATransport,
Loom's event class) and the registry at REGISTRY. JSON lines out, commands in
(`loom_ha.bench.worker`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loom.node.base import Node

from loom_ha._loop import choose_loop
from loom_ha.bench.soak import RecentEvents
from loom_ha.bench.worker import commands, emit, wait_for
from loom_ha.discovery import open_registry
from loom_ha.loom import HALoomApp, loom_transport, start_nodes
from loom_ha.routing import BalancedTransport
from loom_ha.routing.config import balancer_named

__all__ = ["main", "node_id", "routed_transport"]

MIN_WATCHES = 32  # ConsulRegistry's default max_watches


def node_id(prefix: str, n: int) -> str:
    """The id of node `n` of a run (also its registry service name)."""
    return f"{prefix}-n{n:03d}"


def routed_transport(
    broker: str,
    registry: str,
    *,
    instance_id: str | None = None,
    watches: int = MIN_WATCHES,
    balancer: str = "p2c",
) -> BalancedTransport:
    """What ``LOOM_HA_REGISTRY`` builds, plus the one knob the env has not: a Consul client
    routing to N services holds N blocking queries, so it needs ``max_watches >= N``."""
    inner = loom_transport(broker, env={})  # env={}: routing is set up here, not by the shell
    options: dict[str, Any] = {}
    if registry.startswith("consul"):
        options["max_watches"] = max(watches, MIN_WATCHES)
    return BalancedTransport(
        inner,
        open_registry(registry, **options),
        instance_id=instance_id,
        balancer=balancer_named(balancer),
    )


class Echo(Node):  # type: ignore[misc]  # loom ships no type information
    """Answers with its task and counts what it handled."""

    def __init__(self, node: str, dispatcher: Any, handled: Counter[str]) -> None:
        # auto_subscribe=False: upstream would subscribe from an unowned task; start_nodes does.
        super().__init__(node, dispatcher, auto_subscribe=False)
        self._handled = handled

    async def process(self, event: Any) -> Any:
        self._handled[self.node_id] += 1
        return event.data["task"]


async def _node_worker(broker: str, registry: str, prefix: str, nodes: int, instance: str) -> None:
    reader = await commands()
    transport = routed_transport(broker, registry, instance_id=instance)
    app = HALoomApp(transport=transport, store=RecentEvents())
    handled: Counter[str] = Counter()
    members = [Echo(node_id(prefix, n), app.dispatcher, handled) for n in range(nodes)]
    try:
        await app.start()
        emit("started")
        if not await wait_for(reader, "serve"):
            return
        began = time.perf_counter()
        await start_nodes(app, *members)  # subscribes and registers each node, in turn
        emit("ready", seconds=time.perf_counter() - began)
        if not await wait_for(reader, "measure"):
            return
        before, cpu = Counter(handled), time.process_time()
        if not await wait_for(reader, "stop"):
            return
        stats = transport.statistics()
        assert transport.registry is not None
        emit(
            "report",
            handled={m.node_id: handled[m.node_id] - before[m.node_id] for m in members},
            cpu=time.process_time() - cpu,
            heartbeat_failures=transport.registry.statistics().heartbeat_failures,
            handler_errors=stats.handler_errors,
            duplicates_dropped=stats.duplicates_dropped,
        )
    finally:
        began = time.perf_counter()
        await transport.close()  # deregisters every node of this process
        emit("closed", seconds=time.perf_counter() - began)


@dataclass
class Tally:
    """What a run of calls got back."""

    sent: int = 0
    answered: int = 0  # with the right result
    wrong: int = 0  # a result, but not the task sent
    errors: Counter[str] = field(default_factory=Counter)  # exception type -> count
    first_error: dict[str, str] = field(default_factory=dict)  # type -> first message
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        """Calls that got no right answer."""
        return self.sent - self.answered

    def fields(self) -> dict[str, Any]:
        """The tally as message fields."""
        return {
            "sent": self.sent,
            "answered": self.answered,
            "wrong": self.wrong,
            "errors": dict(self.errors),
            "first_error": self.first_error,
            "seconds": self.seconds,
        }


async def calls(
    app: Any, targets: Sequence[str], concurrency: int, *, count: int | None = None,
    seconds: float = math.inf, stop: asyncio.Event | None = None,
) -> Tally:  # fmt: skip
    """`concurrency` callers send `app.run` to `targets` in turn until `count` calls were
    sent, `seconds` passed or `stop` is set; the calls in flight then finish (each within
    its timeout)."""
    tally = Tally()
    started = time.monotonic()
    deadline = started + seconds
    stop = stop or asyncio.Event()
    sent = 0

    async def caller() -> None:
        nonlocal sent
        while time.monotonic() < deadline and (count is None or sent < count):
            if stop.is_set():
                return
            n = sent
            sent += 1
            tally.sent += 1
            task = str(n)
            began = time.perf_counter()
            try:
                result = await app.run(task, target=targets[n % len(targets)])
            except Exception as exc:  # every failure is a lost call: counted, shown once
                kind = type(exc).__name__
                tally.errors[kind] += 1
                tally.first_error.setdefault(kind, str(exc))
                continue
            tally.latencies_ms.append((time.perf_counter() - began) * 1000)
            if result == task:
                tally.answered += 1
            else:
                tally.wrong += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(caller())
    tally.seconds = time.monotonic() - started
    return tally


async def _client_worker(
    broker: str,
    registry: str,
    prefix: str,
    nodes: int,
    concurrency: int,
    duration: float,
    balancer: str,
) -> None:
    reader = await commands()
    transport = routed_transport(broker, registry, watches=nodes, balancer=balancer)
    app = HALoomApp(transport=transport, store=RecentEvents())
    targets = [f"node/{node_id(prefix, n)}" for n in range(nodes)]
    try:
        await app.start()
        emit("started")
        if not await wait_for(reader, "warm"):
            return
        # One call per node: the first answer of each service's watch, the reply
        # subscriptions; measured apart from the run.
        warm = await calls(app, targets, concurrency, count=len(targets))
        emit("warm", **warm.fields())
        if not await wait_for(reader, "go"):
            return
        before, cpu = _routing(transport), time.process_time()
        closing = asyncio.Event()

        async def until_closed() -> None:
            await wait_for(reader, "close")  # or stdin closed
            closing.set()

        async with asyncio.TaskGroup() as group:
            listener = group.create_task(until_closed())
            run = await calls(app, targets, concurrency, seconds=duration, stop=closing)
            listener.cancel()
        if closing.is_set():
            return  # the parent gave up on the run (Ctrl-C, an error): no report
        cpu = time.process_time() - cpu
        after = _routing(transport)
        emit(
            "report",
            **run.fields(),
            latencies_ms=[round(ms, 3) for ms in run.latencies_ms],
            cpu=cpu,
            routing={k: after[k] - before.get(k, 0) for k in after},
        )
    finally:
        await transport.close()


def _routing(transport: BalancedTransport) -> dict[str, int]:
    """The routing counters (routed, unrouted, retries, attempt timeouts, abandoned...)."""
    extra = transport.statistics().extra or {}
    keys = ("routed", "unrouted", "retries", "attempt_timeouts", "abandoned", "replies")
    return {k: int(extra.get(k, 0)) for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker: ``node LOOP BROKER REGISTRY PREFIX NODES INSTANCE`` or
    ``client LOOP BROKER REGISTRY PREFIX NODES CONCURRENCY DURATION BALANCER``."""
    kind, loop, *rest = sys.argv[1:] if argv is None else argv
    # Ctrl-C reaches the whole process group: the parent alone decides, then closes us
    # (stdin), so that every worker still deregisters its nodes and closes its clients.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Warnings carry the time and the worker: the parent's stderr mixes every worker's.
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {kind} {rest[-1] if kind == 'node' else os.getpid()} "
        "%(name)s %(levelname)s: %(message)s",
    )
    runner = choose_loop(loop)
    if kind == "node":
        broker, registry, prefix, nodes, instance = rest
        runner.run(_node_worker(broker, registry, prefix, int(nodes), instance))
    elif kind == "client":
        broker, registry, prefix, nodes, concurrency, duration, balancer = rest
        runner.run(
            _client_worker(
                broker, registry, prefix, int(nodes), int(concurrency), float(duration), balancer
            )
        )
    else:
        raise SystemExit(f"unknown worker {kind!r} (pid {os.getpid()}): node or client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
