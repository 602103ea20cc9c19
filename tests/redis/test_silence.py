"""Chaos: a server that stops answering (SIGSTOP) with nobody else saying so is declared dead.

No Sentinel failover helps here (a standalone server, a Sentinel master frozen for less than
``down-after-milliseconds``, a frozen sentinel): loom-ha must notice the silence itself,
within `SILENCE`, on idle, blocked and listening connections, and come back when the server
answers again. Each test prints when each transport noticed.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from loom_ha.event import CloudEvent
from loom_ha.redis import RedisPubSubTransport, RedisSettings, RedisStreamsTransport
from loom_ha.testing.collect import Collector
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.redis_sentinel import RedisSentinelCluster
from loom_ha.testing.redis_servers import RedisServer
from loom_ha.transport import Transport, TransportState

from ._redis_helpers import eventually, master_other_than

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.timeout(120)]

SILENCE = 2.0
"""The documented default bound on a server's silence (`RedisSettings.socket_timeout`):
a connection to a server that has not answered for this long is declared dead."""


async def _declared_dead(transports: dict[str, Transport], frozen: float) -> dict[str, float]:
    """Seconds after `frozen` at which each transport left CONNECTED (reported the master lost).

    Raises:
        AssertionError: some transport still says CONNECTED 2 * SILENCE after the freeze.
    """
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        for name, t in transports.items():
            if name not in seen and t.statistics().state is not TransportState.CONNECTED:
                seen[name] = time.monotonic() - frozen
        return len(seen) == len(transports)

    try:
        # The bound is the contract (silent for SILENCE → dead); twice it leaves room for
        # a loaded machine while staying below what the old 5 s / 10 s read timeouts took.
        await eventually(all_seen, within=2 * SILENCE)
    except TimeoutError:
        missing = sorted(set(transports) - set(seen))
        raise AssertionError(f"{missing} still CONNECTED {2 * SILENCE}s into the freeze") from None
    return seen


async def _flows_again(
    transports: dict[str, Transport], pairs: list[tuple[Transport, str]]
) -> None:
    """Every transport is CONNECTED again and a new event reaches each subscriber."""
    await eventually(
        lambda: all(t.statistics().state is TransportState.CONNECTED for t in transports.values()),
        within=30,
    )
    for publisher, topic in pairs:
        got = Collector()
        await publisher.subscribe(topic + "/after", got)
        await publisher.publish(topic + "/after", _marker())
        await got.wait_for(1, within=10)


def _seconds(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}s" for name, value in figures.items())


def _marker() -> CloudEvent:
    return CloudEvent.create(source="/chaos/freeze", type="marker", data={})


async def _freeze_and_measure(
    server: RedisServer, transports: dict[str, Transport]
) -> tuple[dict[str, float], float]:
    """Freeze `server` until every transport declared it dead (bounded); resume it.

    Returns when each one noticed, and how long after the resume all were CONNECTED again.
    """
    await asyncio.to_thread(server.pause)
    try:
        declared = await _declared_dead(transports, time.monotonic())
    finally:
        await asyncio.to_thread(server.resume)
    resumed = time.monotonic()
    await eventually(
        lambda: all(t.statistics().state is TransportState.CONNECTED for t in transports.values()),
        within=30,
    )
    return declared, time.monotonic() - resumed


async def test_frozen_server_is_declared_dead_by_idle_and_blocked_connections(
    server_launcher: ServerLauncher,
) -> None:
    """A standalone server that stops answering (SIGSTOP) is declared dead within the silence
    bound by a Streams transport blocked in XREADGROUP and by a Pub/Sub listener, with no
    command in flight; both come back once it answers again."""
    assert RedisSettings().socket_timeout == SILENCE  # the default is the documented bound
    server = await asyncio.to_thread(server_launcher.redis)
    async with (
        RedisStreamsTransport(server.url) as streams,
        RedisPubSubTransport(server.url) as pubsub,
    ):
        await streams.subscribe("freeze/s", Collector(), group="workers")  # blocked in BLOCK 1 s
        await pubsub.subscribe("freeze/p", Collector())
        transports: dict[str, Transport] = {"streams": streams, "pubsub": pubsub}
        declared, back = await _freeze_and_measure(server, transports)
        await _flows_again(transports, [(streams, "freeze/s"), (pubsub, "freeze/p")])
    print(
        f"\n[chaos] redis standalone frozen: declared dead after {_seconds(declared)} "
        f"(bound {SILENCE}s); all CONNECTED {back:.2f}s after the resume"
    )


async def test_sentinel_master_frozen_shorter_than_down_after_is_left_and_rejoined(
    server_launcher: ServerLauncher,
) -> None:
    """A master frozen for less than Sentinel's down-after (no failover) is declared dead within
    the silence bound, then used again as soon as it answers: the sentinels still name it."""
    cluster = await asyncio.to_thread(
        server_launcher.start,
        RedisSentinelCluster(down_after=30.0),  # no failover in this test
    )
    master = await asyncio.to_thread(cluster.master)
    async with (
        RedisStreamsTransport(cluster.url) as streams,
        RedisPubSubTransport(cluster.url) as pubsub,
    ):
        await streams.subscribe("freeze/s", Collector(), group="workers")
        await pubsub.subscribe("freeze/p", Collector())
        transports: dict[str, Transport] = {"streams": streams, "pubsub": pubsub}
        declared, back = await _freeze_and_measure(master, transports)
        await _flows_again(transports, [(streams, "freeze/s"), (pubsub, "freeze/p")])
        endpoints = {t.statistics().endpoint for t in transports.values()}
    assert endpoints == {f"redis://{master.host}:{master.port}/0"}  # the same master again
    print(
        f"\n[chaos] redis sentinel master frozen (no failover): declared dead after "
        f"{_seconds(declared)} (bound {SILENCE}s); all CONNECTED {back:.2f}s after the resume"
    )


async def test_frozen_sentinel_does_not_hold_up_finding_or_following_the_master(
    server_launcher: ServerLauncher,
) -> None:
    """With the first sentinel frozen, a transport connects without waiting for it (the others
    agree), and still follows a failover the remaining sentinels carry out."""
    cluster = await asyncio.to_thread(server_launcher.start, RedisSentinelCluster())
    frozen = cluster.sentinels[0]
    await asyncio.to_thread(frozen.pause)
    try:
        started = time.monotonic()
        transport = RedisStreamsTransport(cluster.url)
        await transport.connect()
        connected = time.monotonic() - started
        async with transport:
            got = Collector()
            await transport.subscribe("freeze/x", got)
            old = await asyncio.to_thread(cluster.master)
            await asyncio.to_thread(
                cluster.sentinels[1].command, "SENTINEL", "FAILOVER", cluster.master_name
            )
            failover = time.monotonic()
            new = await asyncio.to_thread(master_other_than, cluster, old.address)
            await eventually(
                lambda: (
                    transport.statistics().endpoint != f"redis://{old.host}:{old.port}/0"
                    and transport.statistics().state is TransportState.CONNECTED
                ),
                within=30,
            )
            moved = time.monotonic()
            await transport.publish("freeze/x", _marker())
            await got.wait_for(1, within=10)
    finally:
        await asyncio.to_thread(frozen.resume)
    print(
        f"\n[chaos] redis first sentinel frozen: connected in {connected:.2f}s; failover named "
        f"after {new - failover:.2f}s, transport moved after {moved - failover:.2f}s"
    )
    # Asking is bounded by SILENCE per sentinel, and a majority agreeing ends it (the old code
    # asked one sentinel after the other: 5.0 s to connect, 16.3 s to follow, measured).
    assert connected < SILENCE
    assert moved - new < SILENCE
