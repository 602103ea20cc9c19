"""Helpers of the NATS freeze tests: a paced publisher that times every call, a handler that
counts every arrival, stream leader placement, and a report line.

Freezing is SIGSTOP (`NatsServer.pause()`): the server keeps its sockets open and answers
nothing, as in a VM or GC pause; SIGCONT (`resume()`) thaws it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats

from loom_ha.event import CloudEvent
from loom_ha.testing.collect import DeliveryReport, delivery_report
from loom_ha.testing.nats_servers import NatsCluster, NatsServer
from loom_ha.transport import Transport

STREAM = "LOOM"  # JetStreamTransport's default stream


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


@dataclass(eq=False)  # a handler: identity hash
class Counter:
    """A handler that records every arrival (duplicates included) and wakes waiters."""

    calls: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, event: Any) -> None:
        self.calls.append(event.id)
        self.changed.set()

    async def wait_all(self, ids: list[str], within: float) -> None:
        """Wait until every id in `ids` arrived at least once (TimeoutError if not)."""
        wanted = set(ids)
        async with asyncio.timeout(within):
            while not wanted <= set(self.calls):
                self.changed.clear()
                await self.changed.wait()


class Pacer:
    """Publishes numbered events one after the other until stopped.

    Records every accepted id, every error the caller saw, and each call's
    (start, duration): the stall is the longest call.
    """

    def __init__(self, transport: Transport, topic: str, *, pace: float = 0.0) -> None:
        self.transport, self.topic, self.pace = transport, topic, pace
        self.sent: list[str] = []
        self.sent_at: list[float] = []
        self.calls: list[tuple[float, float]] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._accepted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Pacer:
        self._task = asyncio.create_task(self._run(), name="pacer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop after the call in progress (which is let finish) and wait for it."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            event = CloudEvent.create(source="/chaos/freeze", type="chaos.freeze", data={"n": n})
            n += 1
            started = time.monotonic()
            try:
                await self.transport.publish(self.topic, event)
            except Exception as exc:  # counted: the caller saw an error
                self.errors.append(exc)
            else:
                self.sent.append(event.id)
                self.sent_at.append(time.monotonic())
                self._accepted.set()
            self.calls.append((started, time.monotonic() - started))
            await asyncio.sleep(self.pace)

    def stall(self, since: float) -> float:
        """The longest publish call that was still running at or after `since`."""
        return max((d for s, d in self.calls if s + d >= since), default=0.0)

    def stall_end(self, since: float) -> float:
        """When the longest call still running at or after `since` returned."""
        start, seconds = max(
            ((s, d) for s, d in self.calls if s + d >= since),
            key=lambda c: c[1],
            default=(since, 0.0),
        )
        return start + seconds

    def sent_between(self, start: float, end: float) -> int:
        """Events accepted in [start, end]."""
        return sum(1 for t in self.sent_at if start <= t <= end)

    async def wait_until_sent(self, count: int, within: float) -> None:
        """Wait until `count` more events were accepted."""
        target = len(self.sent) + count
        async with asyncio.timeout(within):
            while len(self.sent) < target:
                self._accepted.clear()
                await self._accepted.wait()


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
