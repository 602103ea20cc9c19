"""Health-gated consumption: an unhealthy instance leaves the passing set and stops consuming."""

from __future__ import annotations

import asyncio

import pytest

from loom_ha.discovery import Health, HealthCheck, HealthGate, MemoryRegistry
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.event import CloudEvent
from loom_ha.memory import InMemoryTransport
from loom_ha.testing.collect import Collector
from loom_ha.testing.registry_conformance import eventually
from loom_ha.testing.servers import ConsulAgent

from .conftest import instance


def _event(n: int) -> CloudEvent:
    return CloudEvent.create(source="/node/test", type="job", data={"n": n})


async def test_failing_check_pauses_group_member_and_resumes(service: str) -> None:
    """While its check fails a member leaves the passing set and its group share goes elsewhere."""
    healthy = True
    inner = InMemoryTransport()
    async with MemoryRegistry(ttl=3.0) as registry:
        registration = await registry.register(instance(service, 0))
        gate = HealthGate(inner, registration, check=lambda: healthy, interval=0.05)
        mine, other = Collector("gated"), Collector("other")
        async with gate:
            await gate.subscribe("jobs", mine, group="workers")
            await inner.subscribe("jobs", other, group="workers")
            for n in range(4):
                await gate.publish("jobs", _event(n))
            await mine.wait_for(2)

            healthy = False
            await eventually(lambda: _is(gate, Health.CRITICAL), within=2, what="gate critical")
            assert await registry.instances(service) == []
            listed = await registry.instances(service, passing_only=False)
            assert listed[0].health is Health.CRITICAL and "false" in listed[0].note
            before = len(mine.events)
            for n in range(10):
                await gate.publish("jobs", _event(100 + n))
            await other.wait_for(2 + 10)
            assert len(mine.events) == before
            assert gate.statistics().extra == {
                "health": "critical",
                "health_note": "health check returned false",
                "health_transitions": 1,
                "paused_subscriptions": 1,
            }

            healthy = True
            await eventually(lambda: _is(gate, Health.PASSING), within=2, what="gate passing")
            assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]
            for n in range(4):
                await gate.publish("jobs", _event(200 + n))
            await mine.wait_for(before + 2)


async def test_check_that_raises_or_hangs_counts_as_unhealthy(service: str) -> None:
    """A check that raises, or does not answer within the interval, makes the gate critical."""

    async def hangs() -> bool:
        await asyncio.sleep(10)
        return True

    def raises() -> bool:
        raise ConnectionError("database unreachable")

    checks: list[tuple[HealthCheck, str]] = [
        (raises, "database unreachable"),
        (hangs, "longer than"),
    ]
    for check, reason in checks:
        async with HealthGate(InMemoryTransport(), check=check, interval=0.05) as gate:

            async def critical(g: HealthGate = gate) -> bool:
                return g.health is Health.CRITICAL

            await eventually(critical, within=2, what="critical")
            assert reason in gate.statistics().extra["health_note"]  # type: ignore[index]


async def test_subscriptions_made_while_unhealthy_start_on_recovery() -> None:
    """A subscription made while critical is recorded and goes live when healthy again."""
    inner = InMemoryTransport()
    async with HealthGate(inner) as gate:
        await gate.report(False, "warming up")
        got, probe = Collector("gated"), Collector("probe")
        await gate.subscribe("t", got)
        await inner.subscribe("t", probe)  # ungated, on the same transport
        await gate.publish("t", _event(1))
        # A marker, not a pause: the publish queued event 1 for every live subscription at
        # once, so by the time the probe has handled it, a live `got` would have too.
        await probe.wait_for(1)
        assert got.events == []
        await inner.unsubscribe("t", probe)
        await gate.report(True)
        await gate.publish("t", _event(2))
        (event,) = await got.wait_for(1)
        assert event.data == {"n": 2}
        await gate.unsubscribe("t", got)
        assert gate.statistics().subscriptions == 0


@pytest.mark.consul
async def test_report_turns_the_consul_check_critical_and_back(
    consul_agent: ConsulAgent, service: str
) -> None:
    """report(False) makes the instance's Consul TTL check critical; report(True) passes it."""
    async with ConsulRegistry(f"consul://{consul_agent.address}", ttl=3.0) as registry:
        registration = await registry.register(instance(service, 0))
        async with HealthGate(InMemoryTransport(), registration) as gate:
            await gate.report(Health.CRITICAL, "disk full")
            checks = consul_agent.api(f"health/checks/{service}")
            assert isinstance(checks, list)
            (status,) = [c for c in checks if c["CheckID"] == registry.check_id(instance(service))]
            assert status["Status"] == "critical" and "disk full" in status["Output"]
            assert await registry.instances(service) == []
            await gate.report(Health.PASSING)
            assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]
            # The heartbeat keeps reporting the health chosen last: wait for one to happen
            # (one every ttl/3 = 1 s; the bound is margin for a loaded machine).
            beats = registration.heartbeats

            async def beaten() -> bool:
                return registration.heartbeats > beats

            await eventually(beaten, within=10, what="a heartbeat after report(PASSING)")
            assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]


async def _is(gate: HealthGate, health: Health) -> bool:
    return gate.health is health
