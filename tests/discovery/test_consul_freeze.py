"""A frozen Consul leader (SIGSTOP, sockets open) under registries that talk to a client agent.

Three servers and one client agent. One registry ("steady", TTL longer than the freeze)
registers three instances before the freeze and watches the service; another ("busy",
short TTL) keeps registering instances while the leader is frozen, until a new leader is
elected and as long again (at least `MIN_HOLD`), then the leader is continued.

What it shows (Consul 1.8): a registration makes the client agent sync the catalog, and the
agent holds its local-state lock across that RPC, which hangs on the frozen leader; so the
agent's local API (registrations, TTL passes) hangs until the leader answers again. loom-ha
gives each call up after `timeout` (a transient error), and removes afterwards what a
registration that raised left behind once the agent applies it. Instances whose TTL outlasts
the freeze stay passing; the busy process's (TTL shorter than the freeze) drop out for a
moment when the agent applies the expiry, then come back.

Prints registrations sent / seen / lost / duplicated / raised / left behind, instance
heartbeats failed (steady+busy), how long the watch was stale, the time to the new leader,
the stall (from the freeze to the first registration that succeeded), the longest time from
a registration to the watch showing it, and how long the watch missed an instance.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from loom_ha.discovery import ServiceSnapshot
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.errors import RegistryUnavailableError
from loom_ha.testing.consul_servers import ConsulAgent, ConsulCluster
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.registry_conformance import eventually

from .conftest import consul_url, instance

pytestmark = [pytest.mark.chaos, pytest.mark.consul]

STEADY_TTL = 20.0
"""Longer than any freeze here (at most `MAX_HOLD` + the time to see the new leader)."""
BUSY_TTL = 2.0
"""Shorter than the freeze: the agent expires it while it cannot take heartbeats."""
PACE = 0.5
"""Seconds between two registrations of the busy registry."""
MIN_HOLD = 4.0
"""Shortest freeze: at least this long even when the election is quick."""
MAX_HOLD = 8.0
"""Longest freeze (unless the election itself takes longer): keeps it under STEADY_TTL."""


@dataclass
class Record:
    """What the registries did and the watch saw."""

    registered_at: dict[str, float] = field(default_factory=dict)
    raised: list[BaseException] = field(default_factory=list)
    snapshots: list[tuple[float, ServiceSnapshot]] = field(default_factory=list)

    async def latest(self, predicate: Callable[[ServiceSnapshot], bool]) -> bool:
        """Whether the watch's latest snapshot is fresh and satisfies `predicate`."""
        if not self.snapshots:
            return False
        snap = self.snapshots[-1][1]
        return not snap.stale and predicate(snap)

    def first_seen(self, instance_id: str) -> float:
        return next(t for t, s in self.snapshots if not s.stale and instance_id in s.ids)

    def stale_time(self) -> float:
        """Seconds the watch's latest snapshot was marked stale, in total."""
        total, since = 0.0, None
        for when, snap in self.snapshots:
            if snap.stale and since is None:
                since = when
            elif not snap.stale and since is not None:
                total, since = total + when - since, None
        return total

    def missing_time(self, ids: set[str], after: float) -> float:
        """Seconds after `after` during which a fresh snapshot lacked one of `ids`."""
        total, since = 0.0, None
        for when, snap in self.snapshots:
            if when < after or snap.stale:
                continue
            if not ids <= set(snap.ids) and since is None:
                since = when
            elif ids <= set(snap.ids) and since is not None:
                total, since = total + when - since, None
        return total


async def _new_leader(cluster: ConsulCluster, old: ConsulAgent) -> float:
    """Wait until a live server names a leader other than `old`; return when (monotonic)."""
    follower = next(m for m in cluster.members if m is not old)

    async def elected() -> bool:
        try:
            now = await asyncio.to_thread(follower.leader)
        except OSError:
            return False
        return now is not None and now != old.server_address

    # Bound: raft_multiplier 1 elects in 1-3 s; the rest is a loaded machine.
    await eventually(elected, within=30, what="a new leader")
    return time.monotonic()


async def test_frozen_leader_registrations_heartbeats_and_watches_continue(
    server_launcher: ServerLauncher, service: str
) -> None:
    """While the leader is frozen, instances whose TTL outlasts the freeze stay passing;
    registrations raise a transient error or succeed, none is left behind by one that
    raised; after the election the watch shows exactly the registered set again, and
    heartbeats stop failing."""
    cluster = await asyncio.to_thread(server_launcher.consul_cluster, 3)
    agent = await asyncio.to_thread(server_launcher.start, cluster.client_agent())
    url = consul_url(agent)
    record = Record()
    stop = asyncio.Event()
    async with (
        ConsulRegistry(url, ttl=STEADY_TTL, timeout=1.0, watch_wait=1.0) as steady,
        ConsulRegistry(url, ttl=BUSY_TTL, timeout=1.0, watch_wait=1.0) as busy,
        steady.watch(service) as watch,
        asyncio.TaskGroup() as tg,
    ):

        async def follow() -> None:
            async for snap in watch:
                record.snapshots.append((time.monotonic(), snap))

        async def register(registry: ConsulRegistry, n: int) -> None:
            try:
                await registry.register(instance(service, n))
            except RegistryUnavailableError as exc:  # counted and checked below
                record.raised.append(exc)
                return
            record.registered_at[f"inst-{n}"] = time.monotonic()

        async def keep_registering() -> int:
            n = 100
            while not stop.is_set():
                await register(busy, n)
                n += 1
                await asyncio.sleep(PACE)
            return n

        following = tg.create_task(follow())
        for n in range(3):
            await register(steady, n)
        await register(busy, 3)  # so that the busy process is beating when the freeze starts
        first = {"inst-0", "inst-1", "inst-2"}
        await eventually(lambda: record.latest(lambda s: len(s.ids) == 4), what="four")
        leader = await asyncio.to_thread(cluster.leader_member)
        registering = tg.create_task(keep_registering())
        await asyncio.to_thread(leader.pause)
        frozen = time.monotonic()
        try:
            election = await _new_leader(cluster, leader) - frozen
            hold = max(election, min(MAX_HOLD, max(MIN_HOLD, 2 * election)))
            await asyncio.sleep(hold - (time.monotonic() - frozen))
        finally:
            await asyncio.to_thread(leader.resume)
        held = time.monotonic() - frozen
        stop.set()
        last = await registering
        await register(busy, last)  # one made after the freeze
        everyone = set(record.registered_at)

        # Bound: the watch's query in flight ends within watch_wait + wait/16 + timeout
        # (2.1 s); the agent is back once the leader answers; the busy registry's next round
        # (every BUSY_TTL/3) removes what a registration that raised left at the agent.
        await eventually(
            lambda: record.latest(lambda s: set(s.ids) == everyone), within=30, what="every one"
        )
        recovered = time.monotonic() - frozen
        after = steady.statistics(), busy.statistics()
        # No error loop: once recovered, more heartbeat rounds pass without a failure.
        await asyncio.sleep(BUSY_TTL)
        later = steady.statistics(), busy.statistics()
        assert watch.failures == 0
        following.cancel()
    stats = steady.statistics(), busy.statistics()
    seen = {i for _, s in record.snapshots for i in s.ids}
    duplicated = [i for _, s in record.snapshots for i, n in Counter(s.ids).items() if n > 1]
    lost = sorted(everyone - seen)
    stall = min(t for t in record.registered_at.values() if t > frozen) - frozen
    visible = max(record.first_seen(i) - t for i, t in record.registered_at.items())
    start = record.first_seen("inst-3")
    steady_missing = record.missing_time(first, after=start)
    busy_missing = record.missing_time({"inst-3"}, after=start)
    print(
        f"\n[freeze] consul leader frozen {held:.1f}s (registries on a client agent): "
        f"registered={len(everyone)} raised={len(record.raised)} "
        f"seen={len(seen & everyone)} lost={len(lost)} duplicated={len(duplicated)} "
        f"left_behind={len(seen - everyone)} (removed) "
        f"heartbeats_failed={after[0].heartbeat_failures}+{after[1].heartbeat_failures} "
        f"watch_stale={record.stale_time():.2f}s new_leader_after={election:.2f}s "
        f"stall={stall:.2f}s visible_after={visible:.2f}s current_set_after={recovered:.2f}s "
        f"steady_missing={steady_missing:.2f}s busy_missing={busy_missing:.2f}s "
        f"(TTL {STEADY_TTL:g}s / {BUSY_TTL:g}s)"
    )
    assert lost == [] and duplicated == []
    assert steady_missing == 0.0  # TTL longer than the freeze: never left the passing set
    assert [later[i].heartbeat_failures - after[i].heartbeat_failures for i in (0, 1)] == [0, 0]
    assert all(s.tasks == 0 and s.closed for s in stats)
