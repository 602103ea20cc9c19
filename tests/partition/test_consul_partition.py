"""Partition (c): a Consul client agent, and the instances registered through it, cut off from
the three Consul servers, on real agents in network namespaces.

The majority side (servers and the test process, watching through a server) sees the
agent's node fail by gossip and drops its instances from the passing set. The cut-off side
keeps its TTL heartbeats going to its agent, while its own watch has no server to ask and
keeps its last answer, marked stale. On heal the agent rejoins (serf retries failed members
on a 30 s timer) and its instances are passing again without being registered anew.

The test prints registrations sent / seen back (received) / lost / duplicated, and how long
the majority kept listing the unreachable instances (stall). Cost: ~32 s (cluster start
~4 s, gossip failure detection ~6 s, serf's reconnect ~20 s after the heal).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections import Counter as Tally
from dataclasses import dataclass, field

import pytest

from loom_ha.discovery import ServiceInstance, ServiceSnapshot
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.testing.consul_servers import ConsulAgent, ConsulCluster
from loom_ha.testing.netns import Network

from ._support import eventually

pytestmark = [pytest.mark.chaos, pytest.mark.consul, pytest.mark.timeout(180)]

TTL = 3.0
"""Instance TTL: heartbeats every TTL/3, well inside it, so the cut is the only fault."""
INSTANCES = 3
HOLD = 5.0
"""Seconds the cut lasts after the majority dropped the instances: long enough for the agent
to declare the servers failed too, as in any partition longer than a few seconds (a shorter
one heals by gossip alone, in a fraction of a second)."""


def _instance(service: str, n: int, member_address: str) -> ServiceInstance:
    return ServiceInstance(
        service=service, instance_id=f"inst-{n}", address=f"redis://{member_address}:{6300 + n}"
    )


@dataclass
class Side:
    """What the cut-off side did and saw (written by its thread, read by the test)."""

    registered: list[str] = field(default_factory=list)
    stale_at: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


async def _cut_off_side(url: str, service: str, address: str, side: Side) -> None:
    """Instances on the agent's member: registered through it, heartbeating until told to
    stop, and a watch of the service through the same agent."""
    async with (
        ConsulRegistry(url, ttl=TTL, timeout=1.0, watch_wait=1.0) as registry,
        registry.watch(service) as watch,
    ):
        for n in range(INSTANCES):
            await registry.register(_instance(service, n, address))
            side.registered.append(f"inst-{n}")

        async def record_stale() -> None:
            async for snapshot in watch:
                if snapshot.stale and not side.stale_at:
                    side.stale_at.append(time.monotonic())

        async with asyncio.TaskGroup() as tg:
            watching = tg.create_task(record_stale())
            while not side.stop.is_set():  # noqa: ASYNC110 - a threading.Event
                await asyncio.sleep(0.02)
            watching.cancel()


def _joined(server: ConsulAgent, node: str) -> bool:
    nodes = server.api("catalog/nodes")
    return isinstance(nodes, list) and any(n.get("Node") == node for n in nodes)


async def test_client_agent_cut_off_from_the_servers(netns_network: Network) -> None:
    """The majority drops the cut-off agent's instances from the passing set, and after the
    heal every instance registered through it is passing again: nothing is lost."""
    net = netns_network
    members = [net.add(f"server{i}") for i in range(3)]
    agent_member = net.add("agent")
    cluster = await asyncio.to_thread(
        net.serve, ConsulCluster(3, placements=[m.placement for m in members])
    )
    agent = ConsulAgent(
        dev=False,
        node_name="agent",
        retry_join=[m.serf_lan_address for m in cluster.members],
        name="agent",
        placement=agent_member.placement,
    )
    await asyncio.to_thread(net.serve, agent)
    server = cluster.members[0]
    await eventually(lambda: _joined(server, "agent"), within=30, what="agent joined")

    service = f"svc-{uuid.uuid4().hex[:8]}"
    everyone = [f"inst-{n}" for n in range(INSTANCES)]
    side = Side()
    snapshots: list[ServiceSnapshot] = []
    run = functools.partial(
        _cut_off_side, f"consul://{agent.address}", service, agent_member.address, side
    )
    async with (
        ConsulRegistry(f"consul://{server.address}", watch_wait=1.0, timeout=1.0) as registry,
        registry.watch(service) as watch,
        asyncio.TaskGroup() as tg,
    ):

        async def record() -> None:
            async for snapshot in watch:
                snapshots.append(snapshot)

        def passing() -> list[str]:
            return snapshots[-1].ids if snapshots else []

        recording = tg.create_task(record())
        far = tg.create_task(agent_member.run(run))
        try:
            await eventually(lambda: passing() == everyone, within=30, what="registered")
            net.partition([agent_member])
            cut = time.monotonic()
            dropped = await eventually(lambda: passing() == [], within=60, what="dropped")
            await asyncio.sleep(HOLD)  # the scenario: both sides give each other up
            net.heal()
            healed = time.monotonic()
            # What an operator's `consul join` does: without it, the wait is serf's reconnect
            # timer (a failed member is retried every 30 s), which made this test take 30-57
            # s by the timer's phase, and shows nothing of loom-ha.
            await asyncio.to_thread(
                server.api, f"agent/join/{agent.serf_lan_address}", method="PUT"
            )
            back = await eventually(
                lambda: passing() == everyone, within=60, what="passing after the heal"
            )
            seen_after = set(passing())
        finally:
            side.stop.set()
        await far
        recording.cancel()

    duplicated = [i for s in snapshots for i, n in Tally(s.ids).items() if n > 1]
    lost = [i for i in side.registered if i not in seen_after]
    stale = f"{side.stale_at[0] - cut:.2f}s" if side.stale_at else "-"
    print(
        f"\n[partition] consul client agent cut off: sent={len(side.registered)} "
        f"received={len(seen_after & set(side.registered))} lost={len(lost)} "
        f"duplicated={len(duplicated)} stall={dropped - cut:.2f}s "
        f"back_after_heal={back - healed:.2f}s cut_off_watch_stale_after={stale}"
    )
    assert side.registered == everyone
    assert lost == [] and duplicated == []
