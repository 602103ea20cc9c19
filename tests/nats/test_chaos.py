"""NATS chaos: real 3-node clusters, servers killed under load; every event is counted.

Each scenario prints sent / received / lost / duplicated and the recovery time.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Any

from loom_ha.errors import TransportError
from loom_ha.event import CloudEvent
from loom_ha.ha import HATransport
from loom_ha.nats import JetStreamTransport, NatsCoreTransport, StreamOptions
from loom_ha.testing.collect import delivery_report
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.transport import TransportState

from ._chaos import CONSUMER, MARKS, Counter, node_of

pytestmark = MARKS

FAST_RECONNECT: dict[str, Any] = {"reconnect_wait": 0.05, "connect_timeout": 5.0}


def _event(n: int) -> CloudEvent:
    return CloudEvent.create(source="/chaos/nats", type="chaos", data={"n": n})


def _report(name: str, sent: list[str], calls: list[str], recovery: float) -> Any:
    report = delivery_report(sent, calls)
    print(f"\n[chaos] {name}: {report.summary()} recovery={recovery:.2f}s")
    return report


async def test_jetstream_survives_killing_the_connected_server(
    server_launcher: ServerLauncher,
) -> None:
    """10,000 events to an R3 stream while the connected server is SIGKILLed: none lost,
    none delivered twice to the handler of the application's transport (HATransport: its
    dedup window drops a redelivery whose ack died with the server; the bare consumer is
    at-least-once, as on every durable backend)."""
    cluster = await asyncio.to_thread(server_launcher.nats_cluster)
    stream = StreamOptions(replicas=3)
    got = Counter()
    sent: list[str] = []
    async with HATransport(
        JetStreamTransport(cluster.servers, stream=stream, consumer=CONSUMER, **FAST_RECONNECT)
    ) as js:
        await js.subscribe("chaos.js/orders", got)
        events = [_event(n) for n in range(10_000)]
        victim = node_of(cluster, js)
        killed_at = 0.0
        recovered_at = 0.0
        for start in range(0, len(events), 250):
            chunk = events[start : start + 250]
            if start == 3000:
                await asyncio.to_thread(victim.kill)
                killed_at = time.monotonic()
            await js.publish_many(("chaos.js/orders", e) for e in chunk)
            sent.extend(e.id for e in chunk)
            if killed_at and not recovered_at:
                recovered_at = time.monotonic()
        await got.wait_all(sent, within=60)
        stats = js.statistics()
    report = _report("jetstream kill connected server", sent, got.calls, recovered_at - killed_at)
    print(
        f"[chaos]   reconnects={stats.reconnects} duplicates_dropped={stats.duplicates_dropped} "
        f"extra={stats.extra}"
    )
    assert not report.lost and not report.duplicated and stats.reconnects >= 1


async def test_core_loss_window_is_measured_and_delivery_resumes(
    server_launcher: ServerLauncher,
) -> None:
    """Core NATS loses what was in flight when the connected server dies (reported, not
    asserted), and delivers everything published after the reconnect."""
    cluster = await asyncio.to_thread(server_launcher.nats_cluster, jetstream=False)
    got = Counter()
    back = asyncio.Event()
    sent: list[str] = []
    async with NatsCoreTransport(cluster.servers, **FAST_RECONNECT) as core:
        core.add_state_listener(
            lambda state: back.set() if state is TransportState.CONNECTED else None
        )
        await core.subscribe("chaos.core/orders", got)
        victim = node_of(cluster, core)
        killed_at = 0.0
        for n in range(10_000):
            if n == 3000:
                back.clear()
                await asyncio.to_thread(victim.kill)
                killed_at = time.monotonic()
            event = _event(n)
            try:
                await core.publish("chaos.core/orders", event)
            except TransportError:
                continue  # the publisher saw this one fail: not sent (a bug still raises)
            sent.append(event.id)
            if n % 500 == 0:
                await asyncio.sleep(0)  # let the subscriber run, as a real app would
        async with asyncio.timeout(15):
            await back.wait()
        recovery = time.monotonic() - killed_at
        after = [_event(n) for n in range(100)]
        for event in after:
            await core.publish("chaos.core/orders", event)
        await got.wait_all([e.id for e in after], within=15)
    sent += [e.id for e in after]
    report = _report("core kill connected server", sent, got.calls, recovery)
    print(f"[chaos]   loss window: {len(report.lost)} events; after recovery: 100/100 arrived")
    assert not report.duplicated


async def test_recovers_after_all_servers_were_down_past_the_default_give_up(
    server_launcher: ServerLauncher,
) -> None:
    """With every server down for 70+ reconnect attempts (nats-py would close after 60), the
    transport keeps trying and works again once the cluster is back."""
    cluster = await asyncio.to_thread(server_launcher.nats_cluster)
    got = Counter()
    states: list[TransportState] = []
    async with JetStreamTransport(
        cluster.servers,
        stream=StreamOptions(replicas=3),
        consumer=CONSUMER,
        publish_timeout=45.0,
        **FAST_RECONNECT,
    ) as js:
        js.add_state_listener(states.append)
        await js.subscribe("chaos.outage/x", got)
        before = _event(0)
        await js.publish("chaos.outage/x", before)
        await got.wait_all([before.id], within=10)
        for node in cluster.nodes:
            await asyncio.to_thread(node.kill)
        down_at = time.monotonic()
        # The outage itself: long enough for > 70 failed attempts per server.
        # Polled: the counter is fed by nats-py's error callback, which has no event to await.
        while js.statistics().extra["reconnect_attempts"] < 75 * len(cluster.nodes):  # type: ignore[index]  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        attempts = js.statistics().extra["reconnect_attempts"]  # type: ignore[index]
        for node in cluster.nodes:
            await asyncio.to_thread(node.launch)
        await asyncio.to_thread(cluster.wait_ready)
        after = _event(1)
        await js.publish("chaos.outage/x", after)
        await got.wait_all([after.id], within=30)
        recovery = got.times[after.id] - down_at
        stats = js.statistics()
    _report("all servers down", [before.id, after.id], got.calls, recovery)
    print(f"[chaos]   failed reconnect attempts during the outage: {attempts}")
    assert TransportState.CLOSED not in states and stats.reconnects >= 1


async def test_pull_consumption_resumes_after_a_hard_kill(server_launcher: ServerLauncher) -> None:
    """A SIGKILLed server holding our outstanding pulls does not silence the consumer
    (nats.py #504): pulls are re-issued and new events arrive, each once through the
    application's transport (HATransport drops a copy whose ack died with the server)."""
    cluster = await asyncio.to_thread(server_launcher.nats_cluster)
    got = Counter()
    stream = StreamOptions(replicas=3)
    async with HATransport(
        JetStreamTransport(cluster.servers, stream=stream, consumer=CONSUMER, **FAST_RECONNECT)
    ) as js:
        await js.subscribe("chaos.pull/x", got)
        first = _event(0)
        await js.publish("chaos.pull/x", first)
        await got.wait_all([first.id], within=10)  # idle now: only pulls are outstanding
        victim = node_of(cluster, js)
        await asyncio.to_thread(victim.kill)
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.launch)
        later = [_event(n) for n in range(1, 101)]
        await js.publish_many(("chaos.pull/x", e) for e in later)
        await got.wait_all([e.id for e in later], within=30)
        recovery = max(got.times.values()) - killed_at
        pulls = js.statistics().extra["pulls"]  # type: ignore[index]
    sent = [first.id] + [e.id for e in later]
    report = _report("hard kill during outstanding pulls", sent, got.calls, recovery)
    print(f"[chaos]   pull requests issued: {pulls}")
    assert not report.lost and not report.duplicated


async def test_unacked_events_of_a_killed_member_go_to_another(
    server_launcher: ServerLauncher,
) -> None:
    """A group member killed mid-batch leaves its events unacked; the other member gets
    them after ack_wait, so nothing is lost."""
    cluster = await asyncio.to_thread(server_launcher.nats_cluster)
    topic = f"chaos.group/{uuid.uuid4().hex[:6]}"
    done_by: dict[str, collections.Counter[str]] = {
        "a": collections.Counter(),
        "b": collections.Counter(),
    }
    stuck = asyncio.Event()
    never = asyncio.Event()
    progress = asyncio.Event()

    async def member_a(event: Any) -> None:
        if len(done_by["a"]) >= 20:  # whatever share the broker gives it, it hangs at its 21st
            stuck.set()
            await never.wait()  # hangs mid-batch until the member is killed
        done_by["a"][event.id] += 1
        progress.set()

    async def member_b(event: Any) -> None:
        done_by["b"][event.id] += 1
        progress.set()

    options: dict[str, Any] = {
        "stream": StreamOptions(replicas=3),
        "consumer": CONSUMER,
        **FAST_RECONNECT,
    }
    a = JetStreamTransport(cluster.servers, **options)
    async with JetStreamTransport(cluster.servers, **options) as b:
        await a.connect()
        await a.subscribe(topic, member_a, group="workers")
        events = [_event(n) for n in range(1000)]
        await b.publish_many((topic, e) for e in events)
        async with asyncio.timeout(10):
            await stuck.wait()  # a holds a pulled batch, unacked
        await b.subscribe(topic, member_b, group="workers")
        await a.disconnect()  # the member dies with a batch in flight
        killed_at = time.monotonic()
        sent = [e.id for e in events]
        async with asyncio.timeout(30):
            while not set(sent) <= set(done_by["a"]) | set(done_by["b"]):
                progress.clear()
                await progress.wait()
        recovery = time.monotonic() - killed_at
    calls = list((done_by["a"] + done_by["b"]).elements())
    report = _report("group member killed mid-batch", sent, calls, recovery)
    print(f"[chaos]   handled by a={len(done_by['a'])} b={len(done_by['b'])}")
    assert not report.lost and done_by["b"]
