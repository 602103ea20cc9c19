"""Partition (b): one NATS node cut off from the other two while clients stay connected to it,
on a real 3-node JetStream cluster in network namespaces (R3 stream, leader elsewhere).

Two kinds of client were connected to the node when the link went down:

* on the majority side (the test process): its socket goes silent. loom-ha declares the
  server dead within `NatsOptions.detection_time` (2 s) and reconnects to a node it can
  reach; publishing and consuming go on while the partition lasts.
* on the minority side (a client next to the node): the node still answers its PINGs, so
  it stays. Its JetStream publishes get no acknowledgement (the stream's quorum is on the
  other side) and are retried with the same message id until the partition heals; its core
  publishes reach nobody on the other side.

After the heal the stream sometimes holds an election (the leader changes: the rejoining node
campaigned while cut off), and publishes wait for it for a few seconds; none fails or is lost.
That stall is the server's and is printed (`stall_after_heal`), not held to the move bound.

The test prints sent / received / lost / duplicated / stall for each publisher. Cost: ~20 s
(cluster start ~4 s, the 4 s partition, recovery and draining).
"""

from __future__ import annotations

import asyncio
import functools
import time

import pytest

from loom_ha.nats import JetStreamTransport, NatsCoreTransport, StreamOptions
from loom_ha.nats.options import NatsOptions
from loom_ha.testing.nats_servers import NatsCluster
from loom_ha.testing.netns import Network
from loom_ha.testing.pacer import Pacer
from loom_ha.transport import Transport

from ..nats._chaos import CONSUMER, Counter, place_stream_leader
from ._support import PACE, eventually, report

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.nats,
    pytest.mark.timeout(150),
    # nats-py drops the StreamWriter of a half-made connection when a reconnect attempt
    # meets a server it cannot reach; that leak is the client's, not ours.
    pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning"),
]

JS_TOPIC = "partition.js/orders"
CORE_TOPIC = "partition.core/orders"
STREAM = StreamOptions(replicas=3)
HOLD = 4.0
"""Seconds the partition lasts: twice the detection time, so the majority-side client has
moved and worked on the other side before the heal."""

MOVE_BOUND = NatsOptions().detection_time + 1.0
"""No publish call of the majority-side client lasts longer than this across the cut.

The silent server is declared dead at most `detection_time` (0.5 s x 4 = 2 s) after its last
answer; the publish waiting on that socket is re-sent after <= 0.15 s of backoff to a node
it can reach (TCP and handshake: milliseconds) whose stream leader acks at once. The rest of
the second is headroom for a loaded 2-core machine (the same budget as tests/nats/test_freeze.py).
"""


async def _minority(servers: list[str], js_pacer: Pacer, core_pacer: Pacer) -> None:
    """The client next to the cut-off node: publishes JetStream and core events to it."""
    async with (
        JetStreamTransport(servers, stream=STREAM, consumer=CONSUMER) as js,
        NatsCoreTransport(servers) as core,
        asyncio.TaskGroup() as tg,
    ):
        tg.create_task(js_pacer.run(js, JS_TOPIC))
        tg.create_task(core_pacer.run(core, CORE_TOPIC))


async def test_one_node_cut_off_while_clients_stay_connected(netns_network: Network) -> None:
    """The majority-side client moves within the detection bound and JetStream loses nothing
    any publisher was told was stored, on either side of the cut."""
    net = netns_network
    nodes = [net.add(f"node{i}") for i in range(3)]
    client = net.add("client")
    cluster = await asyncio.to_thread(
        net.serve, NatsCluster(3, placements=[n.placement for n in nodes])
    )
    victim = cluster.nodes[0]
    # Everyone starts on the victim's URL and learns the others from the cluster.
    start = [victim.url]
    got, core_got = Counter(), Counter()
    host = Pacer("host-js", pace=PACE)
    minority_js = Pacer("minority-js", pace=PACE)
    minority_core = Pacer("minority-core", pace=PACE)
    pacers = (host, minority_js, minority_core)
    js_options = {"stream": STREAM, "consumer": CONSUMER}
    async with (
        JetStreamTransport(start, **js_options) as consumer,
        JetStreamTransport(start, **js_options) as publisher,
        NatsCoreTransport(cluster.servers[1:]) as core_consumer,
    ):
        # The stream exists once a JetStream transport connected; its leader goes elsewhere.
        await place_stream_leader(cluster, cluster.nodes[1])
        await consumer.subscribe(JS_TOPIC, got, group="workers")
        await core_consumer.subscribe(CORE_TOPIC, core_got)
        assert _on(publisher) == victim.url and _on(consumer) == victim.url
        async with asyncio.TaskGroup() as tg:
            tg.create_task(host.run(publisher, JS_TOPIC))
            far = tg.create_task(
                client.run(functools.partial(_minority, start, minority_js, minority_core))
            )
            try:
                await eventually(
                    lambda: all(len(p.sent) >= 100 for p in pacers), within=30, what="publishing"
                )
                leader_at_cut = await asyncio.to_thread(_leader_name, cluster)
                net.partition([nodes[0], client])
                cut = time.monotonic()
                await asyncio.sleep(HOLD)  # the scenario: both sides work for a while
                healing = time.monotonic()
                net.heal()
                healed = time.monotonic()
                leader_after_heal = await asyncio.to_thread(_leader_name, cluster)
                await eventually(
                    lambda: len(minority_js.accepted_between(healed)) >= 100,
                    within=60,
                    what="the minority client publishing after the heal",
                )
                await eventually(
                    lambda: len(minority_core.accepted_between(healed)) >= 100,
                    within=30,
                    what="core publishing after the heal",
                )
            finally:
                for pacer in pacers:
                    pacer.stop.set()
            await far
        js_sent = host.sent + minority_js.sent
        await eventually(lambda: set(js_sent) <= set(got.calls), within=60, what="draining")
        # Core is at-most-once, but what is published once the route is back arrives.
        core_late = minority_core.accepted_between(healed + 3.0)
        await eventually(
            lambda: set(core_late) <= set(core_got.calls), within=30, what="core after heal"
        )
        consumer_moved = _moved(consumer, victim.url)
        leader_at_end = await asyncio.to_thread(_leader_name, cluster)
    moved = next((t for t, e in host.moves if t > cut and e != victim.url), None)
    cut_stall = max(moved - cut if moved else float("inf"), host.longest_within(cut, healing))
    report(
        "nats jetstream, node0 cut off",
        js_sent,
        got.calls,
        stall=cut_stall,
        stall_after_heal=host.stall(healing),
        host_moved_after=(moved - cut) if moved else "-",
        host_sent_while_cut=len(host.accepted_between(cut, healed)),
        minority_stall=minority_js.longest,
        minority_acked_while_cut=len(minority_js.accepted_between(cut, healed)),
        minority_errors=len(minority_js.errors),
        consumer_moved=consumer_moved,
        stream_leader=f"{leader_at_cut}->{leader_after_heal}->{leader_at_end}",
    )
    core = report(
        "nats core from the minority side",
        minority_core.sent,
        core_got.calls,
        sent_while_cut=len(minority_core.accepted_between(cut, healed)),
        lost_of_those=len(set(minority_core.accepted_between(cut, healed)) - set(core_got.calls)),
    )
    assert moved is not None and cut_stall <= MOVE_BOUND
    assert set(js_sent) <= set(got.calls)  # nothing acknowledged is lost, on either side
    assert not host.errors, host.errors[:3]
    assert core.unexpected == []


def _leader_name(cluster: NatsCluster) -> str:
    try:
        return str(cluster.stream_leader(STREAM.name).server_name)
    except LookupError:
        return "none"


def _on(transport: Transport) -> str | None:
    return transport.statistics().endpoint


def _moved(transport: Transport, away_from: str) -> bool:
    return _on(transport) != away_from
