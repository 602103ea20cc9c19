"""What routing costs and what it buys: balancer overhead and scaling across instance processes.

* Strategy cost: one ``choose`` + ``started`` + ``record`` per request, pure CPU.
* Decision cost: ``choose`` alone, and the whole cycle, at 10, 100 and 1,000 instances,
  every strategy bare and inside an `Ejector` (``python -m loom_ha.bench.balancing``).
* Routing overhead: request/reply round trips through `BalancedTransport` (registry
  lookup, balancer, inbox publish, reply bookkeeping) beside the same requests sent
  straight to the broker group, same broker, same process.
* Scaling: requests/s of one client over 1, 2 and 3 echo-service processes
  (`loom_ha.bench.echo_server`), each request waiting `work_ms` like an agent on I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from loom_ha.balancing import Balancer, Ejector, LeastOutstanding
from loom_ha.bench.core import BenchRow
from loom_ha.discovery import MemoryRegistry, MemoryStore, ServiceInstance
from loom_ha.event import CloudEvent
from loom_ha.routing import BalancedTransport, default_balancer
from loom_ha.routing.config import balancer_named
from loom_ha.transport import Transport

STRATEGY_NAMES = ("round_robin", "random", "weighted", "least_outstanding", "p2c", "hash:subject")


def _strategies() -> dict[str, Balancer]:
    """Each strategy bare, then the default (P2C with ejection)."""
    found = {name: balancer_named(name, eject=False) for name in STRATEGY_NAMES}
    found["p2c + ejection (default)"] = default_balancer()
    return found


def strategy_rows(calls: int = 50_000, instances: int = 3) -> list[BenchRow]:
    """Microseconds per request spent in each strategy's bookkeeping."""
    pool = [ServiceInstance(service="bench", instance_id=f"i{n}") for n in range(instances)]
    events = [CloudEvent.create(source="/b", type="t", subject=f"s{n % 997}") for n in range(calls)]
    rows = []
    for name, balancer in _strategies().items():
        started = time.perf_counter()
        for event in events:
            chosen = balancer.choose(pool, event)
            balancer.started(chosen)
            balancer.record(chosen, 0.001, True)
        micros = (time.perf_counter() - started) / calls * 1e6
        rows.append(BenchRow(f"strategy {name}", "µs/request", micros, None, "-", False))
    return rows


DECISION_SIZES = (10, 100, 1_000)
WRAPPINGS = ("bare", "in Ejector", "in Ejector, 1% ejected")


def _pool(size: int) -> tuple[ServiceInstance, ...]:
    """`size` instances sorted by id with weights 1-4, as the routing layer hands them over."""
    return tuple(
        ServiceInstance(service="bench", instance_id=f"i{k:05d}", weight=1 + k % 4)
        for k in range(size)
    )


def _prepared(name: str, wrapping: str, pool: Sequence[ServiceInstance]) -> Balancer:
    """A balancer in a steady state: every instance measured, some calls in flight, and
    with ``1% ejected`` one instance in a hundred (at least one) ejected."""
    strategy = balancer_named(name, eject=False)
    balancer: Balancer = strategy
    if wrapping != "bare":
        balancer = Ejector(strategy, consecutive_failures=3, base_ejection=300.0)
    rng = random.Random(7)
    balancer.choose(pool)
    for instance in pool:
        balancer.started(instance)
        balancer.record(instance, rng.uniform(0.001, 0.010), True)
        for _ in range(rng.randrange(3)):
            balancer.started(instance)  # left in flight
    if wrapping.endswith("ejected"):
        logger = logging.getLogger("loom_ha.balancing")
        level = logger.level
        logger.setLevel(logging.ERROR)  # the staged ejections are expected
        try:
            for instance in pool[:: 100 if len(pool) >= 100 else len(pool)]:
                for _ in range(3):
                    balancer.record(instance, 0.001, False)
        finally:
            logger.setLevel(level)
    return balancer


def _per_call(run: Callable[[int], None], rounds: int = 25, budget: float = 0.005) -> float:
    """Microseconds per call: the best of `rounds` runs of about `budget` seconds each, in
    CPU time of this thread (the time a choice takes from the event loop; other processes
    on a busy machine then do not count, and short runs let the best one go unpreempted)."""
    clock = time.thread_time
    begin = clock()
    run(50)
    calls = max(50, min(200_000, int(budget / max(1e-9, (clock() - begin) / 50))))
    best = float("inf")
    for _ in range(rounds):
        begin = clock()
        run(calls)
        best = min(best, (clock() - begin) / calls)
    return best * 1e6


def decision_cost(name: str, wrapping: str, size: int) -> tuple[float, float]:
    """(µs per ``choose``, µs per ``choose`` + ``started`` + ``record``) of one strategy."""
    pool = _pool(size)
    events = [CloudEvent.create(source="/b", type="t", subject=f"s{n}") for n in range(997)]
    balancer = _prepared(name, wrapping, pool)
    cycle = len(events)

    def choose(calls: int) -> None:
        pick = balancer.choose
        for n in range(calls):
            pick(pool, events[n % cycle])

    def full(calls: int) -> None:
        pick, started, record = balancer.choose, balancer.started, balancer.record
        for n in range(calls):
            chosen = pick(pool, events[n % cycle])
            started(chosen)
            record(chosen, 0.005, True)

    return _per_call(choose), _per_call(full)


def decision_rows(sizes: Sequence[int] = DECISION_SIZES) -> list[BenchRow]:
    """One row per strategy, wrapping and size: µs per ``choose`` (the whole cycle with
    ``started`` and ``record`` is printed by ``python -m loom_ha.bench.balancing``)."""
    return [
        BenchRow(
            f"decision {name} {wrapping}, {size:,} instances", "µs/choose",
            decision_cost(name, wrapping, size)[0], None, "-", False,
        )
        for name in STRATEGY_NAMES
        for wrapping in WRAPPINGS
        for size in sizes
    ]  # fmt: skip


class _Client:
    """Sends requests to node `node` on a transport and waits for their replies."""

    def __init__(self, transport: Transport, node: str = "bench") -> None:
        self.transport = transport
        self.requests, self.replies = f"node.request/node/{node}", f"node.response/node/{node}"
        self.waiting: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        await self.transport.connect()
        await self.transport.subscribe(self.replies, self._reply)

    async def _reply(self, event: Any) -> None:
        future = self.waiting.pop(event.data["request_id"], None)
        if future is not None and not future.done():
            future.set_result(None)

    async def call(self) -> None:
        event = CloudEvent.create(source="/bench", type="node.request", data={"task": "x"})
        future = self.waiting[event.id] = asyncio.get_running_loop().create_future()
        await self.transport.publish(self.requests, event)
        async with asyncio.timeout(30):
            await future

    async def round_trip(self) -> float:
        """One sequential round trip, ms."""
        begin = time.perf_counter()
        await self.call()
        return (time.perf_counter() - begin) * 1000

    async def throughput(self, calls: int, concurrency: int) -> float:
        """Requests/s with `concurrency` requests in flight."""
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                await self.call()

        begin = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        return calls / (time.perf_counter() - begin)


async def _echo_server(transport: Transport, node: str = "bench") -> None:
    async def echo(event: Any) -> None:
        reply = CloudEvent.create(
            source=f"/node/{node}", type="node.response", data={"request_id": event.id}
        )
        await transport.publish(f"node.response/node/{node}", reply)

    await transport.connect()
    await transport.subscribe(f"node.request/node/{node}", echo)


async def overhead_rows(make: Callable[[], Transport], label: str, calls: int) -> list[BenchRow]:
    """Round trips through BalancedTransport beside the same requests to the broker group.

    Both pairs run side by side on their own node names and their calls are interleaved
    (latency: one each, in turn; throughput: alternating blocks, best block kept), so
    load from the rest of the machine falls on both alike.
    """
    store = MemoryStore()
    direct = [make(), make()]
    routed: list[Transport] = [
        BalancedTransport(make(), MemoryRegistry(store), instance_id=name)
        for name in ("server", "client")
    ]
    try:
        await _echo_server(direct[0], "bench-direct")
        await _echo_server(routed[0], "bench-routed")
        callers = {"direct": _Client(direct[1], "bench-direct")}
        callers["routed"] = _Client(routed[1], "bench-routed")
        samples: dict[str, list[float]] = {"direct": [], "routed": []}
        rates: dict[str, list[float]] = {"direct": [], "routed": []}
        for caller in callers.values():
            await caller.start()
            await caller.throughput(200, 16)  # warm-up
        for _ in range(calls // 4):
            for key, caller in callers.items():
                samples[key].append(await caller.round_trip())
        for _ in range(3):
            for key, caller in callers.items():
                rates[key].append(await caller.throughput(calls // 3, 64))
    finally:
        for transport in [*direct, *routed]:
            await transport.close()
    p50 = {key: statistics.median(values) for key, values in samples.items()}
    rate = {key: max(values) for key, values in rates.items()}
    return [
        BenchRow(
            f"{label} request/reply p50, routed", "ms", p50["routed"], p50["direct"],
            "direct to the group", False,
        ),
        BenchRow(
            f"{label} routing overhead per request (p50)", "µs",
            (p50["routed"] - p50["direct"]) * 1000, None, "-", False,
        ),
        BenchRow(
            f"{label} request/reply throughput, routed", "req/s", rate["routed"], rate["direct"],
            "direct to the group",
        ),
    ]  # fmt: skip


async def scaling_rows(
    transport_url: str, registry_url: str, *, calls: int, work_ms: float, concurrency: int = 32
) -> list[BenchRow]:
    """Requests/s over 1, 2 and 3 echo-service processes; ratio against one process."""
    from loom_ha.config import create_transport
    from loom_ha.discovery import open_registry

    rows: list[BenchRow] = []
    single: float | None = None
    for count in (1, 2, 3):
        tag = uuid.uuid4().hex[:6]
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loom_ha.bench.echo_server", transport_url,
                registry_url, f"bench-{tag}-{n}", str(work_ms), stdout=subprocess.PIPE,
            )
            for n in range(count)
        ]  # fmt: skip
        client = BalancedTransport(
            create_transport(transport_url),
            open_registry(registry_url),
            instance_id=f"client-{tag}",
            balancer=LeastOutstanding(),
        )
        try:
            for proc in procs:
                assert proc.stdout is not None
                async with asyncio.timeout(30):
                    line = await proc.stdout.readline()
                if line.strip() != b"READY":
                    raise RuntimeError(f"echo server did not start (said {line!r})")
            caller = _Client(client)
            await caller.start()
            await caller.throughput(100, concurrency)  # warm-up, and the watch's first answer
            rate = await caller.throughput(calls, concurrency)
        finally:
            await client.close()
            for proc in procs:
                if proc.returncode is None:
                    proc.terminate()
            for proc in procs:
                await proc.wait()
        single = single or rate
        rows.append(
            BenchRow(
                f"{count} instance process(es), {work_ms:g} ms work, {concurrency} in flight",
                "req/s", rate, single, "1 instance (ratio = scaling)",
            )
        )  # fmt: skip
    return rows


async def balancing_rows(url: str | None, calls: int) -> list[BenchRow]:
    """Every balancing row, on `url` (Redis) or on servers started for the run."""
    from loom_ha.nats import NatsCoreTransport
    from loom_ha.redis import RedisPubSubTransport
    from loom_ha.testing.nats_servers import NatsServer
    from loom_ha.testing.redis_servers import RedisServer

    rows = strategy_rows() + decision_rows()
    with RedisServer() as redis_server, NatsServer() as nats_server:
        redis_url = url or redis_server.url
        rows += await overhead_rows(lambda: RedisPubSubTransport(redis_url), "redis pubsub", calls)
        nats_url = nats_server.url
        rows += await overhead_rows(lambda: NatsCoreTransport([nats_url]), "nats core", calls)
        rows += await scaling_rows(
            f"{nats_url}?mode=core", redis_url, calls=calls // 2, work_ms=5.0
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the decision costs as a matrix (no server needed)."""
    parser = argparse.ArgumentParser(prog="python -m loom_ha.bench.balancing")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DECISION_SIZES))
    args = parser.parse_args(argv)
    sizes = args.sizes
    print("µs per choose (µs per choose + started + record), CPU time, best of 25 runs")
    print(f"{'strategy':<20} {'wrapping':<24}" + "".join(f"{n:>18,}" for n in sizes))
    for name in STRATEGY_NAMES:
        for wrapping in WRAPPINGS:
            cells = [decision_cost(name, wrapping, n) for n in sizes]
            print(
                f"{name:<20} {wrapping:<24}"
                + "".join(f"{f'{c:.2f} ({y:.2f})':>18}" for c, y in cells),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
