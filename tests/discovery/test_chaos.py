"""Discovery under failure: killed instances, a killed Consul leader, agent restarts, outages."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import pytest

from loom_ha.discovery import ServiceSnapshot, Watch
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.registry_conformance import eventually, next_snapshot
from loom_ha.testing.servers import ConsulAgent

from .conftest import consul_url, instance

pytestmark = [pytest.mark.chaos, pytest.mark.consul]

# A process serving many instances: it registers them (one liveness probe each), prints
# "registered", and on SIGUSR1 the handler behind instance "hung" stops answering.
_INSTANCE_PROCESS = """
import asyncio, signal, sys
from loom_ha.discovery import ServiceInstance
from loom_ha.discovery.consul import ConsulRegistry

async def main() -> None:
    url, service, ttl, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    stuck = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stuck.set)

    async def answers() -> bool:
        return True

    async def stops_answering() -> bool:
        if stuck.is_set():
            await asyncio.Event().wait()
        return True

    registry = ConsulRegistry(url, ttl=ttl)
    for n in range(count):
        name = "hung" if n == count // 2 else f"i{n:03d}"
        instance = ServiceInstance(service=service, instance_id=name, address="redis://h:1")
        await registry.register(instance, probe=stops_answering if name == "hung" else answers)
    print("registered", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

KILLED_INSTANCES = 50


def _health_by_id(agent: ConsulAgent, service: str) -> dict[str, tuple[str, str]]:
    """instance id -> (worst check status, note), as the catalog (every watcher) sees it."""
    entries = agent.api(f"health/service/{service}")
    assert isinstance(entries, list)
    found = {}
    for entry in entries:
        statuses = {c["Status"] for c in entry["Checks"]}
        worst = next(s for s in ("critical", "warning", "passing") if s in statuses | {"passing"})
        notes = " ".join(c["Output"] for c in entry["Checks"] if c["Status"] != "passing")
        found[entry["Service"]["Meta"]["loom_instance"]] = (worst, notes)
    return found


async def test_killed_process_turns_all_its_instances_critical_within_ttl(
    server_launcher: ServerLauncher, service: str
) -> None:
    """A process serving 50 instances: a hung one is reported alone; SIGKILL fails them all."""
    ttl = 2.0
    agent = await asyncio.to_thread(server_launcher.consul_agent)
    url = consul_url(agent)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _INSTANCE_PROCESS,
        url,
        service,
        str(ttl),
        str(KILLED_INSTANCES),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).strip() == b"registered"
        async with (
            ConsulRegistry(url, watch_wait=5.0) as registry,
            registry.watch(service) as watch,
        ):
            await next_snapshot(watch, lambda s: len(s.ids) == KILLED_INSTANCES)

            proc.send_signal(signal.SIGUSR1)  # the handler behind "hung" stops answering
            # Bound: the next round (every ttl/3) asks the probe, which times out after a
            # quarter of that; the rest is margin for a loaded machine.
            hung = await next_snapshot(watch, lambda s: "hung" not in s.ids, within=ttl + 5)
            assert len(hung.ids) == KILLED_INSTANCES - 1  # its siblings stay passing
            (reported,) = [
                i for i in await registry.instances(service, passing_only=False) if not i.passing
            ]
            assert reported.instance_id == "hung" and "liveness probe" in reported.note

            proc.kill()
            killed = time.monotonic()

            def all_critical() -> float:
                while True:
                    health = _health_by_id(agent, service)
                    if len(health) == KILLED_INSTANCES and all(
                        status == "critical" for status, _ in health.values()
                    ):
                        return time.monotonic() - killed
                    time.sleep(0.05)

            # Bound: the process's last heartbeat went out before the kill, so its TTL check
            # expires at most `ttl` after it; the agent then turns every alias check critical
            # (in process, milliseconds) and syncs the 50 changes to the catalog this reads.
            # The extra second is for that fan-out and sync (measured: tens of ms) and for
            # this 50 ms poll: a process whose instances outlive their TTL fails here.
            async with asyncio.timeout(ttl + 10):
                took = await asyncio.to_thread(all_critical)
            left = await next_snapshot(watch, lambda s: s.ids == [], within=ttl + 5)
            notes = [note for _, note in _health_by_id(agent, service).values()]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    print(
        f"\nSIGKILLed process with {KILLED_INSTANCES} instances (TTL {ttl}s): all critical in "
        f"the catalog {took:.2f}s after the kill; the watch saw the passing set empty"
    )
    assert took <= ttl + 1.0, f"instances critical {took:.2f}s after the kill (TTL {ttl}s)"
    assert left.ids == [] and all("TTL expired" in note for note in notes)


async def test_leader_kill_registrations_and_watches_continue(
    server_launcher: ServerLauncher, service: str
) -> None:
    """After the Consul leader is killed, heartbeats, registrations and watches carry on."""
    cluster = await asyncio.to_thread(server_launcher.consul_cluster, 3)
    leader = cluster.leader_member()
    follower = next(m for m in cluster.members if m is not leader)
    async with (
        ConsulRegistry(consul_url(follower), ttl=3.0, timeout=1.0, watch_wait=1.0) as registry,
        registry.watch(service) as watch,
    ):
        first = await registry.register(instance(service, 0))
        await next_snapshot(watch, lambda s: s.ids == ["inst-0"])
        old = leader.server_address
        await asyncio.to_thread(leader.kill)
        killed = time.monotonic()

        def new_leader() -> bool:
            try:
                current = follower.leader()
            except OSError:
                return False
            return current is not None and current != old

        async def elected() -> bool:
            return await asyncio.to_thread(new_leader)

        await eventually(elected, within=30, what="a new leader")
        leaderless = time.monotonic() - killed
        second = await registry.register(instance(service, 1))
        snap = await next_snapshot(watch, lambda s: s.ids == ["inst-0", "inst-1"], within=15)
        recovered = time.monotonic() - killed
        assert not snap.stale
        # Carrying on means staying registered and passing (the snapshot above still lists
        # inst-0), not that no beat was ever late: on a loaded machine one beat missed its 1 s
        # timeout during the election and was retried 0.24 s later, well inside the 3 s TTL.
        assert first.active and second.active
    print(
        f"\nleader killed: no leader for {leaderless:.2f}s; watch saw a registration made after "
        f"re-election {recovered:.2f}s after the kill; heartbeat failures {first.failures}"
    )


async def test_agent_restart_every_instance_registers_again(
    server_launcher: ServerLauncher, service: str
) -> None:
    """A dev agent restarted empty gets every live instance back from their own heartbeats."""
    agent = await asyncio.to_thread(server_launcher.consul_agent)
    async with ConsulRegistry(consul_url(agent), ttl=1.0, timeout=1.0) as registry:
        for n in range(3):
            await registry.register(instance(service, n))
        await asyncio.to_thread(agent.restart)
        restarted = time.monotonic()

        async def all_back() -> bool:
            passing = await asyncio.to_thread(agent.api, f"health/service/{service}?passing=1")
            return isinstance(passing, list) and len(passing) == 3

        took = await eventually(all_back, within=10, what="instances registered again")
        stats = registry.statistics()
    print(
        f"\nagent restarted: all 3 instances passing again {took:.2f}s after it was ready "
        f"({time.monotonic() - restarted:.2f}s); re-registrations {stats.reregistrations}, "
        f"failed heartbeats {stats.heartbeat_failures}"
    )
    assert stats.reregistrations >= 3


async def test_consul_unreachable_serves_stale_then_resumes(
    server_launcher: ServerLauncher, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While Consul is frozen for 10 s, discovery serves the last snapshot marked stale; the
    unanswered watch queries are counted, and said once (not once per query)."""
    caplog.set_level(logging.WARNING, logger="loom_ha.discovery")
    agent = await asyncio.to_thread(server_launcher.consul_agent)
    snaps: list[tuple[float, ServiceSnapshot]] = []

    async def record(watch: Watch) -> None:
        async for snap in watch:
            snaps.append((time.monotonic(), snap))

    async with (
        ConsulRegistry(consul_url(agent), ttl=3.0, timeout=1.0, watch_wait=1.0) as registry,
        registry.watch(service) as watch,
    ):
        await registry.register(instance(service, 0))
        await next_snapshot(watch, lambda s: s.ids == ["inst-0"])
        consumer = asyncio.create_task(record(watch))
        await asyncio.to_thread(agent.pause)
        paused = time.monotonic()
        try:
            # Bound: the blocking query in flight gives up after watch_wait + watch_wait/16 +
            # timeout (about 2.1 s) and the watch yields the stale snapshot at once; the
            # margin must leave the checks below inside the 10 s freeze.
            await eventually(
                lambda: _has(snaps, stale=True), within=5, what="stale snapshot while frozen"
            )
            stale_after = time.monotonic() - paused
            during = await registry.snapshot(service)
            assert during.stale and during.ids == ["inst-0"]
            assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]
            await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - paused)))
        finally:
            await asyncio.to_thread(agent.resume)
        resumed = time.monotonic()
        await registry.register(instance(service, 1))
        await eventually(
            lambda: _has(snaps, stale=False, ids=["inst-0", "inst-1"]), within=10, what="resume"
        )
        back_after = time.monotonic() - resumed
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        failures = registry.statistics().watch_failures
    said = [r for r in caplog.records if r.getMessage().startswith(f"watch of {service}:")]
    assert failures >= 2 and len(said) == 1, (failures, caplog.text)
    stale_snap = next(s for _, s in snaps if s.stale)
    assert stale_snap.ids == ["inst-0"] and stale_snap.error
    print(
        f"\nconsul frozen 10s: stale snapshot after {stale_after:.2f}s; watch fresh again "
        f"{back_after:.2f}s after resume (with an instance registered after it)"
    )


async def _has(
    snaps: list[tuple[float, ServiceSnapshot]], *, stale: bool, ids: list[str] | None = None
) -> bool:
    return any(s.stale == stale and (ids is None or s.ids == ids) for _, s in snaps)
