"""Chaos: a NATS node that stops answering (SIGSTOP) while an application publishes and
consumes through HATransport, on a real 3-node cluster with an R3 stream.

A frozen server keeps its sockets open, so nothing errors: loom-ha notices the silence itself
(a PING every 0.5 s, dead once 3 intervals in a row end unanswered: within 2 s,
`NatsOptions.detection_time`), cuts the socket and reconnects, to another node first. Each
test prints one line: sent / received / lost / duplicated / stall (the longest publish
call) and its timings. Default detection settings throughout (that is the contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from loom_ha.config import HA_INNER_PUBLISH_TIMEOUT
from loom_ha.errors import LoomHAError
from loom_ha.event import CloudEvent
from loom_ha.ha.failover import HATransport
from loom_ha.nats import JetStreamTransport, NatsCoreTransport, StreamOptions
from loom_ha.testing.nats_servers import NatsCluster, NatsServer
from loom_ha.testing.pacer import Pacer
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.transport import TransportState

from ._chaos import (
    CONSUMER,
    MARKS,
    STREAM,
    Counter,
    frozen,
    node_of,
    place_stream_leader,
    report,
)

pytestmark = MARKS

TOPIC = "chaos.freeze/orders"

FAILOVER_STALL_BOUND = 3.0
"""Freezing the node a publisher is connected to (not the stream leader): no publish call
waits longer than this.

The server is declared dead at most `detection_time` = 0.5 s x (3 + 1) = 2 s after its
last answer. The publish waiting for its ack on that socket is cut at that moment and re-sent
with the same message id after <= 0.15 s of backoff; the client reconnects to a node it did not
just lose (a TCP and handshake round trip, milliseconds on loopback), and the stream leader,
untouched, acks at once (duplicate=True if the first attempt had got through). The remaining
~0.8 s is headroom for a loaded 2-core machine, where HATransport's 0.2 s health check and
the event loop add their share.
"""

RESUME_AFTER_ELECTION_BOUND = 2.5
"""Freezing the stream leader: publishing resumes at most this long after the cluster
reports a new leader.

Nothing is wrong with the publisher's connection; the stream simply has no leader until
raft elects one (nats-server: 4-9 s election timeout, measured and printed). Each publish
attempt waits `ack_timeout` (1.5 s) for an ack, then backs off <= 0.5 s (0.4 s + 0.1 s jitter)
and re-sends: one cycle is <= 2 s, so the first attempt that reaches the new leader starts
within 2 s of the election. 0.5 s over that covers the 0.1 s polling of the monitoring
endpoint that dates the election and HATransport's recovery pacing.
"""


def _jetstream(servers: list[str]) -> HATransport:
    """An application's transport: HATransport over JetStream, detection at its defaults."""
    return HATransport(
        lambda: JetStreamTransport(
            servers,
            stream=StreamOptions(replicas=3),
            consumer=CONSUMER,
            publish_timeout=HA_INNER_PUBLISH_TIMEOUT,
        )
    )


class StateLog:
    """When the inner transport of an HATransport left and regained CONNECTED."""

    def __init__(self, ha: HATransport) -> None:
        self.lost: list[float] = []
        self.back: list[float] = []
        inner: Any = ha.inner
        inner.add_state_listener(self._record)

    def _record(self, state: TransportState) -> None:
        if state is TransportState.RECONNECTING:
            self.lost.append(time.monotonic())
        elif state is TransportState.CONNECTED:
            self.back.append(time.monotonic())

    def timings(self, since: float) -> str:
        """Seconds from `since` to the first loss and to the first return after it."""
        lost = next((t - since for t in self.lost if t >= since), None)
        back = next((t - since for t in self.back if t >= since), None)
        return f"{lost:.2f}s/{back:.2f}s" if lost is not None and back is not None else "-"


async def test_jetstream_freezing_the_connected_node_fails_over_within_3s(
    server_launcher: ServerLauncher,
) -> None:
    """The node both publisher and consumer are connected to freezes (the stream leader is
    elsewhere): publishing stalls at most 3 s and goes on while the node is still frozen;
    nothing is lost, nothing reaches the handler twice, the caller sees no error."""
    cluster: NatsCluster = await asyncio.to_thread(server_launcher.nats_cluster)
    got = Counter()
    started = time.monotonic()
    async with _jetstream(cluster.servers) as publisher:
        victim = node_of(cluster, publisher.inner)
        await place_stream_leader(cluster, next(n for n in cluster.nodes if n is not victim))
        # The consumer knows only the victim's URL; it learns the others from the cluster.
        async with _jetstream([victim.url]) as consumer:
            await consumer.subscribe(TOPIC, got, group="workers")
            pub_states, sub_states = StateLog(publisher), StateLog(consumer)
            async with Pacer("freeze").publishing(publisher, TOPIC) as pacer:
                await pacer.wait_until_sent(50, within=10)
                async with frozen(victim) as froze:
                    # Publishing must go on while the node is still frozen.
                    await pacer.wait_until_sent(200, within=15)
                    after_failover = len(pacer.accepted_between(froze + 0.1, time.monotonic()))
                await pacer.wait_until_sent(50, within=15)
            await got.wait_all(pacer.sent, within=30)
            stats = (publisher.statistics(), consumer.statistics())
    stall = pacer.stall(froze)
    counts = report(
        "jetstream, connected node frozen",
        pacer,
        got,
        stall,
        detected_and_back_pub=pub_states.timings(froze),
        detected_and_back_sub=sub_states.timings(froze),
        sent_while_frozen=after_failover,
        dead_servers=f"{stats[0].extra['dead_servers']}/{stats[1].extra['dead_servers']}",
        duplicate_publishes=stats[0].extra.get("duplicate_publishes"),
        in_progress=stats[0].extra.get("publish_in_progress"),
        run=f"{time.monotonic() - started:.1f}s",
    )
    assert not pacer.errors, pacer.errors[:3]
    assert not counts.lost and not counts.duplicated
    assert stall <= FAILOVER_STALL_BOUND
    assert stats[0].extra["dead_servers"] >= 1 and stats[1].extra["dead_servers"] >= 1


async def _first_new_leader(cluster: NatsCluster, old: NatsServer) -> float:
    """The moment a live node first reports a new stream leader (polled every 0.1 s)."""
    while True:
        with contextlib.suppress(LookupError):
            if await asyncio.to_thread(cluster.stream_leader, STREAM) is not old:
                return time.monotonic()
        await asyncio.sleep(0.1)  # polling a monitoring endpoint: nothing to await instead


async def test_jetstream_freezing_the_stream_leader_stalls_for_the_election_only(
    server_launcher: ServerLauncher,
) -> None:
    """The stream leader freezes (the publisher is connected elsewhere; the consumer to the
    frozen node): publishing stalls until raft elects a new leader and resumes within 2.5 s
    of it; nothing is lost or handled twice, the caller sees no error."""
    cluster: NatsCluster = await asyncio.to_thread(server_launcher.nats_cluster)
    got = Counter()
    started = time.monotonic()
    async with _jetstream(cluster.servers) as publisher:
        home = node_of(cluster, publisher.inner)
        victim = next(n for n in cluster.nodes if n is not home)
        await place_stream_leader(cluster, victim)
        async with _jetstream([victim.url]) as consumer:
            await consumer.subscribe(TOPIC, got, group="workers")
            async with Pacer("freeze").publishing(publisher, TOPIC) as pacer:
                await pacer.wait_until_sent(50, within=10)
                async with frozen(victim) as froze:
                    elected_at = await asyncio.wait_for(_first_new_leader(cluster, victim), 30)
                    await pacer.wait_until_sent(100, within=30)
                await pacer.wait_until_sent(50, within=15)
            await got.wait_all(pacer.sent, within=30)
    stall = pacer.stall(froze)
    resumed_at = pacer.stall_end(froze)
    election = elected_at - froze
    counts = report(
        "jetstream, stream leader frozen",
        pacer,
        got,
        stall,
        election=f"{election:.2f}s",
        resumed_after_election=f"{resumed_at - elected_at:.2f}s",
        run=f"{time.monotonic() - started:.1f}s",
    )
    assert not pacer.errors, pacer.errors[:3]
    assert not counts.lost and not counts.duplicated
    assert resumed_at - elected_at <= RESUME_AFTER_ELECTION_BOUND


async def test_core_freezing_the_connected_node_measures_the_loss_window(
    server_launcher: ServerLauncher,
) -> None:
    """Core NATS (at most once): publisher and subscriber on the node that freezes. What
    was in flight is lost (printed, not asserted); delivery resumes while the node is still
    frozen, nothing arrives twice, the caller sees no error."""
    cluster: NatsCluster = await asyncio.to_thread(server_launcher.nats_cluster, jetstream=False)
    got = Counter()
    started = time.monotonic()
    async with HATransport(lambda: NatsCoreTransport(cluster.servers)) as publisher:
        victim = node_of(cluster, publisher.inner)
        async with HATransport(lambda: NatsCoreTransport([victim.url])) as subscriber:
            await subscriber.subscribe(TOPIC, got)
            async with Pacer("freeze", pace=0.001).publishing(publisher, TOPIC) as pacer:
                await pacer.wait_until_sent(200, within=10)
                async with frozen(victim) as froze:
                    before = len(got.calls)
                    async with asyncio.timeout(15):  # delivery resumes while still frozen
                        while len(got.calls) < before + 200:
                            got.changed.clear()
                            await got.changed.wait()
                thawed = time.monotonic()
                await pacer.wait_until_sent(300, within=15)
            tail = pacer.accepted_between(thawed + 1.0)
            await got.wait_all(tail, within=15)
    arrived = set(got.calls)
    lost_at = [t for i, t in zip(pacer.sent, pacer.accepted_at, strict=True) if i not in arrived]
    window = f"{max(lost_at) - min(lost_at):.2f}s" if lost_at else "0s"
    counts = report(
        "core, connected node frozen",
        pacer,
        got,
        pacer.stall(froze),
        loss_window=window,
        run=f"{time.monotonic() - started:.1f}s",
    )
    assert not pacer.errors, pacer.errors[:3]
    assert not counts.duplicated


async def test_a_publish_still_being_stored_is_confirmed_not_raised(
    server_launcher: ServerLauncher,
) -> None:
    """With both followers frozen the leader stages a publish it cannot commit; the retry
    meets "duplicate message id is in process" (10158), which is waited out and confirmed
    once the followers are back: publish() returns, the stream holds the event once."""
    cluster: NatsCluster = await asyncio.to_thread(server_launcher.nats_cluster)
    leader = cluster.nodes[0]
    followers = cluster.nodes[1:]
    async with JetStreamTransport(
        [leader.url], stream=StreamOptions(replicas=3), ack_timeout=0.5
    ) as js:
        await place_stream_leader(cluster, leader)
        await js.publish(TOPIC, CloudEvent.create(source="/t", type="warm", data=0))
        event = CloudEvent.create(source="/t", type="staged", data=1)
        for node in followers:
            await asyncio.to_thread(node.pause)
        try:
            publishing = asyncio.ensure_future(js.publish(TOPIC, event))
            # No quorum: the publish cannot complete. 3 s = several 0.5 s ack timeouts,
            # each followed by a re-publish the leader answers with 10158.
            done, _ = await asyncio.wait({publishing}, timeout=3.0)
            assert not done, publishing.exception() if done else None
        finally:
            for node in followers:
                await asyncio.to_thread(node.resume)
        try:
            await asyncio.wait_for(publishing, 30)
        except LoomHAError as exc:
            pytest.fail(f"publish raised {exc!r} (cause {exc.__cause__!r})")
        info = await js.js.stream_info(STREAM)
        extra = js.statistics().extra
    print(
        f"\n[freeze] in-process answers={extra['publish_in_progress']} "
        f"duplicate acks={extra['duplicate_publishes']} stream messages={info.state.messages}"
    )
    assert extra["publish_in_progress"] >= 1  # the 10158 path ran
    assert info.state.messages == 2  # the warm-up event and this one, stored once
