"""Chaos tests against real Redis servers: kill, fail over, restart; count every event.

Each test prints one line: sent / received / lost / duplicated / recovery time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from loom_ha.errors import TransportError
from loom_ha.event import CloudEvent
from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport, RedisTransport
from loom_ha.redis._base import RedisTransportBase
from loom_ha.testing.collect import Collector, delivery_report
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import RedisSentinelCluster
from loom_ha.transport import Transport, TransportState

from ._redis_helpers import eventually, master_other_than

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.timeout(150)]

BURST = 10_000


def _event(n: int) -> CloudEvent:
    return CloudEvent.create(source="/chaos", type="chaos", data={"n": n})


class Publisher:
    """Publishes numbered events back to back, recording when each was accepted."""

    def __init__(self, transport: Transport, topic: str) -> None:
        self.transport, self.topic = transport, topic
        self.sent: list[str] = []
        self.accepted_at: list[float] = []
        self.errors: list[BaseException] = []
        self.progress = asyncio.Event()

    async def run(self, count: int) -> None:
        for n in range(count):
            event = _event(n)
            try:
                await self.transport.publish(self.topic, event)
            except TransportError as exc:  # every publish either arrives or raises
                self.errors.append(exc)
                continue
            self.sent.append(event.id)
            self.accepted_at.append(time.monotonic())
            self.progress.set()

    def first_after(self, moment: float) -> float:
        """When the first publish accepted after `moment` was accepted."""
        return next(t for t in self.accepted_at if t > moment)


async def _moved(transports: Sequence[Transport], cluster: RedisSentinelCluster) -> None:
    """Wait until every transport uses the sentinels' current master and listens again."""
    master = await asyncio.to_thread(cluster.master_address)
    endpoint = f"redis://{master[0]}:{master[1]}/0"
    await eventually(
        lambda: all(
            t.statistics().endpoint == endpoint and t.statistics().state is TransportState.CONNECTED
            for t in transports
        ),
        within=30,
    )


def _print(scenario: str, sent: list[str], received: list[str], **figures: Any) -> None:
    report = delivery_report(sent, received)
    extra = " ".join(
        f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[chaos] {scenario}: {report.summary()} {extra}")


async def test_streams_master_sigkill_during_burst_loses_nothing(
    server_launcher: ServerLauncher,
) -> None:
    """SIGKILL of the master while 10,000 events are published in streams mode loses none."""
    cluster = await asyncio.to_thread(server_launcher.redis_sentinel)
    got = Collector()
    options: dict[str, Any] = {"publish_timeout": 60.0, "claim_idle": 2.0, "block": 0.5}
    async with (
        RedisStreamsTransport(cluster.url, **options) as sub,
        RedisStreamsTransport(cluster.url, **options) as pub,
    ):
        await sub.subscribe("chaos/burst", got, group="workers")
        publisher = Publisher(pub, "chaos/burst")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(publisher.run(BURST))
            await eventually(lambda: len(publisher.sent) >= BURST // 3, within=60)
            old = await asyncio.to_thread(cluster.master)
            await asyncio.to_thread(old.kill)
            killed = time.monotonic()
            promoted = await asyncio.to_thread(master_other_than, cluster, old.address)
        await got.wait_until(
            lambda: set(publisher.sent) <= set(got.ids), within=60, what=lambda: "all events"
        )
        first_ok = publisher.first_after(killed)
        stats = sub.statistics()
    report = delivery_report(publisher.sent, got.ids)
    _print(
        "streams SIGKILL master",
        publisher.sent,
        got.ids,
        publish_errors=len(publisher.errors),
        promotion=promoted - killed,
        recovery_after_promotion=max(0.0, first_ok - promoted),
        outage=first_ok - killed,
        redelivered=stats.redelivered,
    )
    assert not publisher.errors and len(publisher.sent) == BURST
    assert report.lost == [] and report.unexpected == []


async def test_pubsub_master_sigkill_measures_loss_and_resumes(
    server_launcher: ServerLauncher,
) -> None:
    """SIGKILL of the master in Pub/Sub mode: the loss window is reported and delivery resumes."""
    cluster = await asyncio.to_thread(server_launcher.redis_sentinel)
    got = Collector()
    async with RedisPubSubTransport(cluster.url) as sub, RedisPubSubTransport(cluster.url) as pub:
        await sub.subscribe("chaos/*", got)
        publisher = Publisher(pub, "chaos/burst")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(publisher.run(BURST))
            await eventually(lambda: len(publisher.sent) >= BURST // 3, within=60)
            old = await asyncio.to_thread(cluster.master)
            await asyncio.to_thread(old.kill)
            killed = time.monotonic()
            promoted = await asyncio.to_thread(master_other_than, cluster, old.address)
        await _moved([sub, pub], cluster)
        resumed = max(sub.connector.last_move or 0.0, pub.connector.last_move or 0.0)
        after = Publisher(pub, "chaos/after")
        await after.run(200)
        await got.wait_until(
            lambda: set(after.sent) <= set(got.ids), within=20, what=lambda: "post-recovery"
        )
    report = delivery_report(publisher.sent, got.ids)
    lost = set(report.lost)
    lost_times = [
        t for i, t in zip(publisher.sent, publisher.accepted_at, strict=True) if i in lost
    ]
    window = (max(lost_times) - min(lost_times)) if lost_times else 0.0
    _print(
        "pubsub SIGKILL master",
        publisher.sent,
        [i for i in got.ids if i in set(publisher.sent)],
        loss_window=window,
        promotion=promoted - killed,
        moved_after_kill=resumed - killed,
        after_recovery_lost=len(delivery_report(after.sent, got.ids).lost),
    )
    assert not publisher.errors and report.duplicated == []


@pytest.mark.parametrize("mode", ["pubsub", "streams"])
async def test_sentinel_failover_with_old_master_alive_moves_everyone(
    server_launcher: ServerLauncher, mode: str
) -> None:
    """After SENTINEL FAILOVER (old master still up) nobody stays on it: nothing later is lost."""
    cluster = await asyncio.to_thread(server_launcher.redis_sentinel)
    cls: type[RedisTransportBase] = (
        RedisPubSubTransport if mode == "pubsub" else (RedisStreamsTransport)
    )
    got = Collector()
    async with cls(cluster.url) as sub, cls(cluster.url) as pub:
        await sub.subscribe("chaos/x", got)
        before = Publisher(pub, "chaos/x")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(before.run(3000))
            await eventually(lambda: len(before.sent) >= 500, within=30)
            old = await asyncio.to_thread(cluster.master)
            started = time.monotonic()
            await asyncio.to_thread(
                cluster.sentinels[0].command, "SENTINEL", "FAILOVER", cluster.master_name
            )
            await asyncio.to_thread(cluster.wait_for_failover, old.address)
        await _moved([sub, pub], cluster)
        switched = max(sub.connector.last_move or 0.0, pub.connector.last_move or 0.0)
        assert old.alive and old.info()["role"] == "slave"
        after = Publisher(pub, "chaos/x")
        await after.run(500)
        await got.wait_until(
            lambda: set(after.sent) <= set(got.ids), within=20, what=lambda: "after the switch"
        )
    _print(
        f"{mode} SENTINEL FAILOVER",
        before.sent + after.sent,
        got.ids,
        after_switch_sent=len(after.sent),
        after_switch_lost=len(delivery_report(after.sent, got.ids).lost),
        moved_after_failover_command=switched - started,
    )
    assert delivery_report(after.sent, got.ids).lost == []
    assert not before.errors and not after.errors  # every publish arrived (none raised)


async def test_sentinel_failover_moves_both_modes_of_a_mixed_transport(
    server_launcher: ServerLauncher,
) -> None:
    """After SENTINEL FAILOVER a RedisTransport's Pub/Sub and Streams topics both use the new
    master (one connector follows it for both) and nothing published afterwards is lost."""
    cluster = await asyncio.to_thread(server_launcher.redis_sentinel)
    rules = {"chaos/fast/*": "pubsub"}
    got = Collector()
    async with (
        RedisTransport(cluster.url, topic_modes=rules) as sub,
        RedisTransport(cluster.url, topic_modes=rules) as pub,
    ):
        await sub.subscribe("chaos/*", got)
        before = [Publisher(pub, "chaos/fast/x"), Publisher(pub, "chaos/slow/x")]
        async with asyncio.TaskGroup() as tg:
            for publisher in before:
                tg.create_task(publisher.run(1000))
            await eventually(lambda: all(len(p.sent) >= 200 for p in before), within=30)
            old = await asyncio.to_thread(cluster.master)
            started = time.monotonic()
            await asyncio.to_thread(
                cluster.sentinels[0].command, "SENTINEL", "FAILOVER", cluster.master_name
            )
            await asyncio.to_thread(cluster.wait_for_failover, old.address)
        await _moved([sub, pub], cluster)
        switched = max(sub.connector.last_move or 0.0, pub.connector.last_move or 0.0)
        after = [Publisher(pub, "chaos/fast/x"), Publisher(pub, "chaos/slow/x")]
        for publisher in after:
            await publisher.run(300)
        sent_after = [i for p in after for i in p.sent]
        await got.wait_until(
            lambda: set(sent_after) <= set(got.ids), within=20, what=lambda: "after the switch"
        )
        pubsub_stats = sub.statistics().extra
    sent_before = [i for p in before for i in p.sent]
    _print(
        "mixed SENTINEL FAILOVER",
        sent_before + sent_after,
        got.ids,
        after_switch_lost=len(delivery_report(sent_after, got.ids).lost),
        moved_after_failover_command=switched - started,
    )
    assert delivery_report(sent_after, got.ids).lost == []
    assert not any(p.errors for p in before + after)
    assert pubsub_stats is not None and pubsub_stats["pubsub"]["listening"]
    # Pub/Sub never duplicates, even across the switch (streams may: at-least-once).
    counts = Counter(got.ids)
    assert [i for i in before[0].sent + after[0].sent if counts[i] > 1] == []


async def test_streams_group_recreated_after_restart_without_persistence(
    server_launcher: ServerLauncher,
) -> None:
    """A restart that empties Redis: the group is recreated, reported, and consumption resumes."""
    server = await asyncio.to_thread(server_launcher.redis)
    got = Collector()
    async with (
        RedisStreamsTransport(server.url, block=0.3) as sub,
        RedisStreamsTransport(server.url) as pub,
    ):
        await sub.subscribe("chaos/r", got, group="workers")
        before = Publisher(pub, "chaos/r")
        await before.run(100)
        await got.wait_for(100)
        stopped = time.monotonic()
        await asyncio.to_thread(server.restart)
        after = Publisher(pub, "chaos/r")
        await after.run(100)
        await got.wait_until(
            lambda: set(after.sent) <= set(got.ids), within=30, what=lambda: "after restart"
        )
        recovered = time.monotonic()
        stats = sub.statistics()
    _print(
        "streams restart without persistence",
        before.sent + after.sent,
        got.ids,
        groups_recreated=stats.extra["groups_recreated"] if stats.extra else 0,
        recovery=recovered - stopped,
    )
    assert stats.extra is not None and stats.extra["groups_recreated"] >= 1
    assert delivery_report(before.sent + after.sent, got.ids).lost == []


async def test_consumer_killed_mid_batch_is_reclaimed(server_launcher: ServerLauncher) -> None:
    """Entries a cancelled group member left unacknowledged are reclaimed by another: 0 lost."""
    server = await asyncio.to_thread(server_launcher.redis)
    handled, survivor = Collector("dying"), Collector("survivor")
    stuck = asyncio.Event()

    async def dies_mid_batch(event: Any) -> None:
        if len(handled.events) >= 10:
            stuck.set()
            await asyncio.Event().wait()  # hangs until the member is cancelled
        await handled(event)

    options: dict[str, Any] = {"claim_idle": 0.5, "claim_interval": 0.2, "block": 0.2}
    async with RedisStreamsTransport(server.url, **options) as pub:
        dying = RedisStreamsTransport(server.url, **options)
        await dying.connect()
        await dying.subscribe("chaos/jobs", dies_mid_batch, group="workers")
        publisher = Publisher(pub, "chaos/jobs")
        await publisher.run(300)
        async with asyncio.timeout(10):
            await stuck.wait()
        killed = time.monotonic()
        await dying.disconnect()  # cancelled mid-batch: nothing more is acked
        async with RedisStreamsTransport(server.url, **options) as other:
            await other.subscribe("chaos/jobs", survivor, group="workers")
            await survivor.wait_until(
                lambda: set(publisher.sent) <= set(handled.ids) | set(survivor.ids),
                within=20,
                what=lambda: "reclaimed",
            )
            reclaimed = other.statistics().redelivered
    _print(
        "streams consumer killed mid-batch",
        publisher.sent,
        handled.ids + survivor.ids,
        reclaimed=reclaimed,
        recovery=time.monotonic() - killed,
    )
    assert delivery_report(publisher.sent, handled.ids + survivor.ids).lost == []
    assert reclaimed > 0


@pytest.mark.parametrize("mode", ["pubsub", "streams"])
async def test_tls_and_acl_auth(server_launcher: ServerLauncher, mode: str) -> None:
    """Over TLS with an ACL user events flow; a wrong password fails at connect, not later."""
    server = await asyncio.to_thread(
        server_launcher.redis, tls=True, username="app", password="s3cret pw"
    )
    assert server.url.startswith("rediss://app:") and server.ca_file is not None
    cls: type[RedisTransportBase] = (
        RedisPubSubTransport if mode == "pubsub" else (RedisStreamsTransport)
    )
    got = Collector()
    async with cls(server.url, ssl_ca_certs=str(server.ca_file)) as t:
        await t.subscribe("secure/x", got)
        sent = _event(1)
        await t.publish("secure/x", sent)
        await got.wait_for(1)
        assert t.statistics().endpoint == f"rediss://127.0.0.1:{server.port}/0"
    bad = cls(server.url, password="wrong", ssl_ca_certs=str(server.ca_file))
    with pytest.raises(TransportError, match="credentials"):
        await bad.connect()
    await bad.disconnect()
    assert got.ids == [sent.id]
