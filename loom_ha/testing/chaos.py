"""The chaos scenario behind `loom-ha chaos` and the HA chaos tests.

Start a local cluster (Redis + Sentinel, or a 3-node NATS cluster with JetStream)
with the shipped launchers, run a publisher and a consumer through `HATransport`,
kill a broker mid-run (SIGKILL), and count every event: sent, received, lost,
duplicated, and how long publishing stalled.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from loom_ha.config import create_transport
from loom_ha.event import CloudEvent
from loom_ha.transport import Transport

Broker = Literal["redis", "nats"]
DURABLE_MODE = {"redis": "streams", "nats": "jetstream"}
TOPIC = "chaos.event/node/producer"
Progress = Callable[[str, int, int], None]
"""Told (phase, sent, received) as the run goes."""


@dataclass(frozen=True)
class ChaosReport:
    """What one chaos run counted."""

    broker: str
    mode: str
    killed: str
    sent: int
    received: int
    lost: int
    duplicated: int
    recovery_seconds: float | None
    publish_errors: int

    def summary(self) -> str:
        """One line with every figure."""
        recovery = f"{self.recovery_seconds:.2f}s" if self.recovery_seconds is not None else "-"
        return (
            f"{self.broker}/{self.mode}: killed {self.killed}; sent={self.sent} "
            f"received={self.received} lost={self.lost} duplicated={self.duplicated} "
            f"recovery={recovery} publish_errors={self.publish_errors}"
        )


def start_cluster(broker: Broker) -> Any:
    """Start a Sentinel-managed Redis or a 3-node NATS cluster (blocking)."""
    if broker == "redis":
        from loom_ha.testing.redis_sentinel import RedisSentinelCluster

        return RedisSentinelCluster().start()
    from loom_ha.testing.nats_servers import NatsCluster

    return NatsCluster(3, jetstream=True).start()


def cluster_url(broker: Broker, cluster: Any, mode: str) -> str:
    """The transport URL of a running cluster in `mode`."""
    if broker == "redis":
        return f"{cluster.url}?mode={mode}"
    return ",".join(cluster.servers) + f"?mode={mode}"


def pick_victim(broker: Broker, cluster: Any, publisher: Transport) -> Any:
    """The server to kill: Redis' master, or the NATS node the publisher is connected to."""
    if broker == "redis":
        return cluster.master()
    endpoint = publisher.statistics().endpoint or ""
    for node in cluster.nodes:
        if endpoint.endswith(f":{node.port}"):
            return node
    return cluster.nodes[0]


async def run_chaos(
    broker: Broker,
    *,
    events: int = 10_000,
    kill_at: float = 0.3,
    mode: str | None = None,
    options: str = "",
    progress: Progress | None = None,
    drain_timeout: float = 90.0,
) -> ChaosReport:
    """Run the scenario on a fresh local cluster and return its figures.

    Args:
        broker: ``redis`` or ``nats``.
        events: events to publish, one after the other.
        kill_at: fraction of `events` published before the kill.
        mode: transport mode (default: the durable one).
        options: extra query-string options for both transports (``outbox=fail_fast``).
        progress: called with (phase, sent, received) as the run goes.
        drain_timeout: seconds to wait for stragglers after the last publish.
    """
    mode = mode or DURABLE_MODE[broker]
    tell = progress or (lambda phase, sent, received: None)
    tell("starting cluster", 0, 0)
    cluster = await asyncio.to_thread(start_cluster, broker)
    try:
        url = cluster_url(broker, cluster, mode) + (f"&{options}" if options else "")
        seen: collections.Counter[str] = collections.Counter()

        def count(event: Any) -> None:
            seen[event.id] += 1

        async with create_transport(url) as consumer, create_transport(url) as publisher:
            await consumer.subscribe(TOPIC, count, group="chaos")
            kill_index = int(events * kill_at)
            sent: list[str] = []
            errors = 0
            killed_at: float | None = None
            recovery: float | None = None  # the longest publish after the kill
            victim_name = "-"
            for i in range(events):
                if i == kill_index:
                    victim = pick_victim(broker, cluster, publisher)
                    victim_name = victim.name
                    tell(f"killing {victim_name}", len(sent), len(seen))
                    killed_at = time.monotonic()
                    await asyncio.to_thread(victim.kill)
                event = CloudEvent.create(source="/chaos/producer", type="chaos.event", data=i)
                started = time.monotonic()
                try:
                    await publisher.publish(TOPIC, event)
                    sent.append(event.id)
                except Exception:
                    errors += 1
                if killed_at is not None:
                    # Recovery: the longest a publish stalled after the kill.
                    stall = time.monotonic() - started
                    recovery = max(recovery or 0.0, stall)
                if i % 100 == 0:
                    tell("publishing", len(sent), len(seen))
            tell("draining", len(sent), len(seen))
            deadline = time.monotonic() + drain_timeout
            wanted = set(sent)
            while time.monotonic() < deadline and not wanted <= seen.keys():
                await asyncio.sleep(0.1)
                tell("draining", len(sent), len(seen))
            tell("done", len(sent), len(seen))
    finally:
        await asyncio.to_thread(cluster.stop)
    return ChaosReport(
        broker=broker,
        mode=mode,
        killed=victim_name,
        sent=len(sent),
        received=len(wanted & seen.keys()),
        lost=len(wanted - seen.keys()),
        duplicated=sum(n - 1 for n in seen.values() if n > 1),
        recovery_seconds=recovery,
        publish_errors=errors,
    )
