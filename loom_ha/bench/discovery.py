"""Registry micro-benchmark: one process's calls one after another, and watch propagation.

Run ``python -m loom_ha.bench.discovery [URL] [--instances N] [--samples N]``; without a URL
it starts a private ``consul agent -dev`` (from `loom_ha.testing`) and stops it afterwards.
Heartbeats themselves cost per process, not per instance: `loom_ha.bench.discovery_scale`
measures them (and 1,000 instances, 10 processes, 10 watchers) over minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from loom_ha.discovery import Health, ServiceInstance, open_registry

__all__ = ["RegistryBenchResult", "bench_registry", "main"]


@dataclass(frozen=True, kw_only=True)
class RegistryBenchResult:
    """What one run measured."""

    url: str
    instances: int
    registrations_per_s: float
    heartbeats_per_s: float
    deregistrations_per_s: float
    propagation_ms: list[float]

    def summary(self) -> str:
        """Human-readable lines."""
        lat = sorted(self.propagation_ms)
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
        return "\n".join(
            [
                f"registry {self.url}, {self.instances} instances (sequential calls)",
                f"  register:    {self.registrations_per_s:8.0f} /s "
                f"({1000 / self.registrations_per_s:.2f} ms each)",
                f"  set_health:  {self.heartbeats_per_s:8.0f} /s "
                f"({1000 / self.heartbeats_per_s:.2f} ms each, one report request)",
                f"  deregister:  {self.deregistrations_per_s:8.0f} /s",
                f"  watch propagation (change -> snapshot), {len(lat)} changes: "
                f"median {statistics.median(lat):.1f} ms, p95 {p95:.1f} ms, max {lat[-1]:.1f} ms",
            ]
        )


async def bench_registry(
    url: str, *, instances: int = 200, samples: int = 40
) -> RegistryBenchResult:
    """Measure the registry at `url` with `instances` registrations and `samples` watch changes."""
    service = f"bench-{uuid.uuid4().hex[:8]}"
    made = [
        ServiceInstance(service=service, instance_id=f"i{n}", address=f"redis://10.0.0.1:{n}")
        for n in range(instances)
    ]
    async with open_registry(url, ttl=30.0) as registry:
        start = time.perf_counter()
        registrations = [await registry.register(inst) for inst in made]
        register_s = time.perf_counter() - start

        start = time.perf_counter()
        for registration in registrations:
            await registration.set_health(Health.PASSING)  # one report, sent now
        heartbeat_s = time.perf_counter() - start

        start = time.perf_counter()
        for registration in registrations:
            await registration.deregister()
        deregister_s = time.perf_counter() - start

        latencies: list[float] = []
        arrived: asyncio.Queue[tuple[float, list[str]]] = asyncio.Queue()

        async def consume() -> None:
            # A separate task keeps the watch blocked in its query when each change happens.
            async for snap in registry.watch(service):
                await arrived.put((time.perf_counter(), snap.ids))

        probe = ServiceInstance(service=service, instance_id="probe", address="redis://x:1")
        async with asyncio.TaskGroup() as group:
            consumer = group.create_task(consume())
            assert (await arrived.get())[1] == []
            for n in range(samples):
                await asyncio.sleep(0.02)  # let the watch block again
                start = time.perf_counter()
                if n % 2 == 0:
                    await registry.register(probe)
                else:
                    await registry.deregister(probe)
                when, ids = await asyncio.wait_for(arrived.get(), 10)
                assert ids == ([] if n % 2 else ["probe"])
                latencies.append((when - start) * 1000)
            consumer.cancel()
    return RegistryBenchResult(
        url=url,
        instances=instances,
        registrations_per_s=instances / register_s,
        heartbeats_per_s=instances / heartbeat_s,
        deregistrations_per_s=instances / deregister_s,
        propagation_ms=latencies,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the summary."""
    parser = argparse.ArgumentParser(prog="python -m loom_ha.bench.discovery")
    parser.add_argument("url", nargs="?", help="registry URL (default: a private consul -dev)")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args(argv)
    if args.url:
        result = asyncio.run(
            bench_registry(args.url, instances=args.instances, samples=args.samples)
        )
    else:
        from loom_ha.testing.servers import ConsulAgent

        with ConsulAgent() as agent:
            url = f"consul://{agent.address}"
            result = asyncio.run(
                bench_registry(url, instances=args.instances, samples=args.samples)
            )
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
