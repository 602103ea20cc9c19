"""Helpers of the NATS chaos tests (servers killed or frozen on a real 3-node cluster): their
marks and consumer settings, a handler that counts every arrival, stream leader placement,
freezing a node, and the freeze tests' report line.

Freezing is SIGSTOP (`NatsServer.pause()`): the server keeps its sockets open and answers
nothing, as in a VM or GC pause; SIGCONT (`resume()`) thaws it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from loom_ha.nats import ConsumerOptions
from loom_ha.policy import DeliveryPolicy
from loom_ha.testing.collect import DeliveryReport, delivery_report
from loom_ha.testing.nats_servers import NatsCluster, NatsServer
from loom_ha.testing.pacer import Pacer
from loom_ha.transport import Transport

STREAM = "LOOM"  # JetStreamTransport's default stream

MARKS = [
    pytest.mark.chaos,
    pytest.mark.nats,
    # nats-py drops the StreamWriter of a half-made connection when a server accepts TCP but
    # dies, is still starting or does not answer during the handshake; that leak is the
    # client's, not ours.
    pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning"),
]

CONSUMER = ConsumerOptions(
    # Events pulled into a dead or frozen node's socket come back after ack_wait: short, so
    # a test drains in seconds (the default 30 s loses nothing either, it only takes longer).
    ack_wait=2.0,
    heartbeat=0.25,
    pull_expires=3.0,
    policy=DeliveryPolicy(max_deliveries=50, backoff_initial=0.05, backoff_max=0.5),
)


def node_of(cluster: NatsCluster, transport: Transport) -> NatsServer:
    """The node `transport` is connected to."""
    endpoint = transport.statistics().endpoint or ""
    for node in cluster.nodes:
        if endpoint.endswith(f":{node.port}"):
            return node
    raise LookupError(f"no node serves {endpoint!r}")


async def place_stream_leader(
    cluster: NatsCluster, leader: NatsServer, within: float = 20.0
) -> None:
    """Move `STREAM`'s leader to `leader` (a step-down naming the preferred node, repeated
    until the cluster reports it: the first one can land while the group is still settling)."""
    live = [n.url for n in cluster.nodes if n.alive and not n.paused]
    nc = await nats.connect(live, connect_timeout=2)
    request = json.dumps({"placement": {"preferred": leader.server_name}}).encode()
    try:
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(LookupError):
                    if await asyncio.to_thread(cluster.stream_leader, STREAM) is leader:
                        return
                with contextlib.suppress(nats.errors.Error):
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", request, timeout=2)
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def frozen(node: NatsServer) -> AsyncIterator[float]:
    """SIGSTOP `node` for the block (yields the moment it froze); always thawed after."""
    await asyncio.to_thread(node.pause)
    try:
        yield time.monotonic()
    finally:
        await asyncio.to_thread(node.resume)


class Counter:
    """A handler that records every arrival (duplicates included) with the time of each id's
    first one, and wakes waiters."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.times: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        self.calls.append(event.id)
        self.times.setdefault(event.id, time.monotonic())
        self.changed.set()

    async def wait_all(self, ids: list[str], within: float) -> None:
        """Wait until every id in `ids` arrived at least once (TimeoutError if not)."""
        wanted = set(ids)
        async with asyncio.timeout(within):
            while not wanted <= set(self.calls):
                self.changed.clear()
                await self.changed.wait()


def report(name: str, pacer: Pacer, got: Counter, stall: float, **extra: object) -> DeliveryReport:
    """Print the test's one line and return the counts."""
    counts = delivery_report(pacer.sent, got.calls)
    figures = " ".join(f"{k}={v}" for k, v in extra.items())
    print(
        f"\n[freeze] {name}: sent={counts.sent} received={len(set(got.calls))} "
        f"lost={len(counts.lost)} duplicated={len(counts.duplicated)} stall={stall:.2f}s "
        f"errors={len(pacer.errors)} {figures}"
    )
    return counts
