"""Measuring primitives shared by every backend's benchmark rows.

Throughput is events published back to back until the subscriber received the
last one; latency is a ping on one topic answered by a handler on another. Both
work on any object with Loom's transport methods, so a raw-client adapter can be
measured by the very same code as loom-ha's transports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRow:
    """One measured figure for loom-ha and, when there is one, its baseline."""

    name: str
    unit: str
    ours: float
    baseline: float | None
    baseline_name: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """ours / baseline (for times: baseline / ours), so > 1 means loom-ha is better."""
        if not self.baseline or not self.ours:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


async def measure_throughput(
    make_transport: Callable[[], Any], make_event: Callable[[int], Any], events: int
) -> float:
    """Events/s from the first publish until the subscriber received the last event."""
    transport = make_transport()
    await transport.connect()
    received = 0
    done = asyncio.Event()

    async def count(event: Any) -> None:
        nonlocal received
        received += 1
        if received >= events:
            done.set()

    try:
        await transport.subscribe("bench.throughput/x", count)
        batch = [make_event(i) for i in range(events)]
        started = time.perf_counter()
        for event in batch:
            await transport.publish("bench.throughput/x", event)
        async with asyncio.timeout(120):
            await done.wait()
        return events / (time.perf_counter() - started)
    finally:
        await transport.disconnect()


async def measure_latency(
    make_transport: Callable[[], Any],
    make_event: Callable[[int], Any],
    pings: int,
    *,
    fresh_reply: bool = False,
) -> tuple[float, float]:
    """p50 and p99 round-trip time in ms of a ping answered by a handler.

    With `fresh_reply` the handler answers with a new event instead of echoing the
    ping (JetStream drops a re-published event id inside its duplicate window).
    """
    transport = make_transport()
    await transport.connect()
    pong: asyncio.Future[None] | None = None

    async def reply(event: Any) -> None:
        await transport.publish("bench.pong/x", make_event(-1) if fresh_reply else event)

    async def got_pong(event: Any) -> None:
        if pong is not None and not pong.done():
            pong.set_result(None)

    samples: list[float] = []
    try:
        await transport.subscribe("bench.ping/x", reply)
        await transport.subscribe("bench.pong/x", got_pong)
        loop = asyncio.get_running_loop()
        for i in range(pings):
            pong = loop.create_future()
            started = time.perf_counter()
            await transport.publish("bench.ping/x", make_event(i))
            async with asyncio.timeout(10):
                await pong
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await transport.disconnect()
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]
