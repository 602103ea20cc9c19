"""The registry conformance suite: behaviours every `ServiceRegistry` backend must show.

Use it by subclassing and providing a `registry_backend` fixture::

    from loom_ha.testing.registry_conformance import RegistryBackend, RegistryConformance

    class TestMyRegistry(RegistryConformance):
        @pytest.fixture
        def registry_backend(self, my_server) -> RegistryBackend:
            return RegistryBackend("mine", lambda **kw: MyRegistry(my_server.url, **kw))

The factory takes the registry's keyword options (``ttl=``...) and must return registries
that share one backend, so that one can observe what another registered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from loom_ha.discovery import (
    Health,
    ServiceInstance,
    ServiceRegistry,
    ServiceSnapshot,
    Watch,
)
from loom_ha.errors import ConfigurationError, RegistryError

__all__ = ["RegistryBackend", "RegistryConformance", "eventually", "next_snapshot"]


@dataclass(frozen=True)
class RegistryBackend:
    """How the suite builds registries of one backend.

    Attributes:
        name: shown in messages.
        factory: ``factory(**options)`` returns a new registry on the shared backend.
        expired_stay_listed: an instance whose TTL expired is still listed (critical) by
            ``instances(passing_only=False)`` (Consul, memory), rather than gone (Redis).
    """

    name: str
    factory: Callable[..., ServiceRegistry]
    expired_stay_listed: bool = True

    @asynccontextmanager
    async def registries(
        self, count: int = 1, **options: Any
    ) -> AsyncIterator[list[ServiceRegistry]]:
        """`count` registries on the backend, closed at exit."""
        async with AsyncExitStack() as stack:
            made = [self.factory(**options) for _ in range(count)]
            for registry in made:
                stack.push_async_callback(registry.close)
            yield made


async def eventually(
    probe: Callable[[], Awaitable[bool]], *, within: float = 10.0, what: str = "condition"
) -> float:
    """Poll `probe` until it returns True; return the seconds it took.

    Raises:
        AssertionError: not within `within` seconds (naming `what`).
    """
    start = time.monotonic()
    while True:
        if await probe():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not reached within {within}s")
        await asyncio.sleep(0.02)


async def next_snapshot(
    watch: Watch, predicate: Callable[[ServiceSnapshot], bool], *, within: float = 10.0
) -> ServiceSnapshot:
    """The first snapshot from `watch` (including its latest one) that satisfies `predicate`."""
    if watch.latest is not None and predicate(watch.latest):
        return watch.latest
    async with asyncio.timeout(within):
        async for snap in watch:
            if predicate(snap):
                return snap
    raise AssertionError(f"watch of {watch.service} ended before the expected snapshot")


def make_instance(service: str, n: int = 0, **fields: Any) -> ServiceInstance:
    """An instance of `service` numbered `n`, with a transport URL and some meta."""
    return ServiceInstance(
        service=service,
        instance_id=f"inst-{n}",
        address=f"redis://10.0.0.{n + 1}:6379",
        tags=("loom", f"n{n}"),
        meta={"version": "1.2.3", "transport": "redis"},
        **fields,
    )


class RegistryConformance:
    """Behaviours every registry shows; subclass and provide a `registry_backend` fixture."""

    @pytest.fixture
    def service(self) -> str:
        """A service name unique to the test, so tests never see each other's instances."""
        return f"conf-{uuid.uuid4().hex[:10]}"

    async def test_register_lists_instance_with_its_fields(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """A registered instance is listed as passing, with address, tags, meta and weight."""
        async with registry_backend.registries(2) as (mine, other):
            registration = await mine.register(make_instance(service, weight=3))
            assert registration.active and registration.heartbeats >= 1
            (found,) = await other.instances(service)
            assert found.instance_id == "inst-0" and found.health is Health.PASSING
            assert found.address == "redis://10.0.0.1:6379"
            assert set(found.tags) == {"loom", "n0"}
            assert found.version == "1.2.3" and found.transport == "redis"
            assert found.weight == 3
            assert service in await other.services()

    async def test_deregister_removes_instance(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """deregister() removes the instance at once and is idempotent."""
        async with registry_backend.registries() as (registry,):
            keep = await registry.register(make_instance(service, 0))
            gone = await registry.register(make_instance(service, 1))
            await gone.deregister()
            await registry.deregister(gone)
            listed = await registry.instances(service, passing_only=False)
            assert [i.instance_id for i in listed] == ["inst-0"]
            assert not gone.active and keep.active
            assert registry.statistics().registrations == 1

    async def test_duplicate_registration_is_rejected(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """Registering the same instance twice on one registry raises RegistryError."""
        async with registry_backend.registries() as (registry,):
            await registry.register(make_instance(service))
            with pytest.raises(RegistryError, match="already registered"):
                await registry.register(make_instance(service))

    async def test_passing_only_follows_reported_health(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """A critical instance leaves the passing set (still listed with its note) and returns."""
        async with registry_backend.registries(2) as (mine, other):
            sick = await mine.register(make_instance(service, 0))
            await mine.register(make_instance(service, 1))
            await sick.set_health(Health.CRITICAL, "database down")
            assert [i.instance_id for i in await other.instances(service)] == ["inst-1"]
            listed = {i.instance_id: i for i in await other.instances(service, passing_only=False)}
            assert listed["inst-0"].health is Health.CRITICAL
            assert "database down" in listed["inst-0"].note
            await sick.set_health(Health.PASSING)
            passing = await other.instances(service)
            assert [i.instance_id for i in passing] == ["inst-0", "inst-1"]

    async def test_heartbeat_keeps_instance_alive_past_its_ttl(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """Past its TTL the instance is still passing, kept alive by a heartbeat every TTL/3."""
        # TTL 1.5 s, a beat every 0.5 s: only a stall of the heartbeat (or the backend)
        # longer than 1 s lets the TTL run out (with 0.6 s it was 0.4 s).
        ttl = 1.5
        async with registry_backend.registries(ttl=ttl) as (registry,):
            registration = await registry.register(make_instance(service))
            assert registration.interval <= ttl / 3 + 1e-9
            beats = registration.heartbeats  # register() reports the first one
            # Longer than the TTL (asyncio.sleep never returns early): without heartbeats
            # the instance would have expired by now. The time passing is the test.
            await asyncio.sleep(ttl + 1.0)
            assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]
            # At least one beat after registering, or the TTL would have run out: a count
            # of beats per second would be a benchmark, not a behaviour.
            assert registration.heartbeats > beats
            assert registration.last_heartbeat is not None

    async def test_ttl_expiry_when_heartbeat_stops(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """Every instance of a registry whose heartbeat stops leaves the passing set at its TTL."""
        ttl = 1.0
        async with registry_backend.registries(ttl=ttl) as (observer,):
            crashing = registry_backend.factory(ttl=ttl)
            for n in range(3):
                await crashing.register(make_instance(service, n))
            await crashing.close(deregister=False)  # heartbeat stops, nothing deregistered

            async def gone() -> bool:
                return not await observer.instances(service)

            # Bound: the last beat was before close(), so the TTL runs out within `ttl` of
            # now; Consul's catalog then follows its agent by anti-entropy (measured at up
            # to 1.3 s); the rest is margin for a loaded machine. An instance that never
            # expires fails here; where expired ones stay listed, one that was deregistered
            # instead fails below.
            await eventually(gone, within=ttl + 5.0, what="expired instances leave passing set")
            listed = await observer.instances(service, passing_only=False)
            if registry_backend.expired_stay_listed:
                assert [i.health for i in listed] == [Health.CRITICAL] * 3
            else:
                assert listed == []

    async def test_one_heartbeat_round_beats_for_every_instance(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """Instances sharing a TTL share one heartbeat: each round confirms every one of them."""
        count = 20
        async with registry_backend.registries(ttl=1.5) as (registry,):
            registrations = [
                await registry.register(make_instance(service, n)) for n in range(count)
            ]
            assert registry.statistics().tasks == 1  # one loop, not one per instance

            async def two_rounds() -> bool:
                return registry.statistics().heartbeat_rounds >= 2

            # Bound: a round every 0.5 s; the rest is margin for a loaded machine.
            await eventually(two_rounds, within=10.0, what="two heartbeat rounds")
            stats = registry.statistics()  # read at once: a round updates it in one step
            assert stats.heartbeats == count + count * stats.heartbeat_rounds
            assert stats.heartbeat_failures == 0
            assert {r.heartbeats for r in registrations} == {1 + stats.heartbeat_rounds}
            assert len(await registry.instances(service)) == count

    async def test_hung_instance_is_reported_while_its_siblings_pass(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """An instance whose liveness probe hangs or fails goes critical; its siblings stay."""
        hang, released = asyncio.Event(), asyncio.Event()
        refuse = False

        async def stuck_probe() -> bool:
            if hang.is_set():
                await released.wait()  # a handler that stopped answering
            return True

        async def refusing_probe() -> bool:
            return not refuse

        async with registry_backend.registries(2, ttl=1.5) as (mine, other):
            await mine.register(make_instance(service, 0), probe=stuck_probe)
            await mine.register(make_instance(service, 1), probe=refusing_probe)
            sibling = await mine.register(make_instance(service, 2), probe=lambda: True)

            async def passing(*ids: str) -> bool:
                return [i.instance_id for i in await other.instances(service)] == list(ids)

            # Bounds: the probes are asked every round (0.5 s) and answer within the probe
            # timeout (0.125 s); the rest is margin for a loaded machine.
            await eventually(lambda: passing("inst-0", "inst-1", "inst-2"), within=10.0)
            hang.set()
            refuse = True
            await eventually(lambda: passing("inst-2"), within=10.0, what="hung ones critical")
            listed = {i.instance_id: i for i in await other.instances(service, passing_only=False)}
            assert listed["inst-0"].health is Health.CRITICAL
            assert "liveness probe took longer than" in listed["inst-0"].note
            assert listed["inst-1"].health is Health.CRITICAL
            assert "liveness probe returned false" in listed["inst-1"].note
            assert sibling.health is Health.PASSING and sibling.failures == 0
            hang.clear()
            released.set()
            refuse = False
            await eventually(lambda: passing("inst-0", "inst-1", "inst-2"), within=10.0)

    async def test_forgotten_instance_is_registered_again(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """When the backend loses an instance (agent restart, flush), the heartbeat restores it."""
        async with registry_backend.registries(2, ttl=0.9) as (mine, other):
            await mine.register(make_instance(service))
            await other.deregister(make_instance(service))  # the backend forgets it

            async def back() -> bool:
                return [i.instance_id for i in await other.instances(service)] == ["inst-0"]

            # Bound: the next heartbeat (within interval = 0.3 s) finds the instance gone and
            # registers it again; Consul's catalog follows its agent within ~1.3 s; the
            # rest is margin for a loaded machine.
            await eventually(back, within=10.0, what="instance registered again")
            assert mine.statistics().reregistrations >= 1

    async def test_watch_sees_additions_and_removals(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """A watch yields the current snapshot, then each addition and removal."""
        async with registry_backend.registries(2) as (mine, watcher):
            async with watcher.watch(service) as watch:
                first = await next_snapshot(watch, lambda s: True)
                assert first.instances == () and not first.stale
                a = await mine.register(make_instance(service, 0))
                await next_snapshot(watch, lambda s: s.ids == ["inst-0"])
                await mine.register(make_instance(service, 1))
                added = await next_snapshot(watch, lambda s: s.ids == ["inst-0", "inst-1"])
                await a.set_health(Health.CRITICAL, "unhealthy")
                await next_snapshot(watch, lambda s: s.ids == ["inst-1"])
                await a.deregister()
                await mine.deregister(make_instance(service, 1))
                removed = await next_snapshot(watch, lambda s: s.ids == [])
                assert removed.index >= added.index >= 1
                assert watcher.statistics().watches == 1
            assert watcher.statistics().watches == 0

    async def test_watches_of_one_service_share_one_query_loop(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """Every watch of a service in one registry follows one query loop; each sees changes."""
        async with registry_backend.registries(2) as (mine, watcher):
            first, second = watcher.watch(service), watcher.watch(service)
            everyone = watcher.watch(service, passing_only=False)
            assert watcher.statistics().watched_services == 1
            assert watcher.statistics().watches == 3
            registration = await mine.register(make_instance(service, 0))
            for watch in (first, second, everyone):
                await next_snapshot(watch, lambda s: s.ids == ["inst-0"])
            await registration.set_health(Health.CRITICAL, "sick")
            await next_snapshot(first, lambda s: s.ids == [])
            await first.aclose()
            assert watcher.statistics().watched_services == 1  # the others still follow it
            await next_snapshot(second, lambda s: s.ids == [])
            sick = await next_snapshot(everyone, lambda s: not s.instances[0].passing)
            assert sick.ids == ["inst-0"]
            await second.aclose()
            await everyone.aclose()
            assert watcher.statistics().watched_services == 0
            assert watcher.statistics().tasks == 0

    async def test_close_deregisters_ends_watches_and_leaves_no_task(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """close() deregisters every instance, ends watches and leaves no task behind."""
        tasks_before = len(asyncio.all_tasks())
        async with registry_backend.registries() as (observer,):
            registry = registry_backend.factory()
            for n in range(3):
                await registry.register(make_instance(service, n))
            assert registry.statistics().tasks == 1  # one heartbeat for the three
            watch = registry.watch(service)
            await next_snapshot(watch, lambda s: len(s.ids) == 3)
            assert registry.statistics().tasks == 2  # and one query loop for the watch
            consumer = asyncio.create_task(_drain(watch))
            await asyncio.sleep(0.05)  # let it block in its query
            await registry.close()
            await registry.close()  # idempotent
            async with asyncio.timeout(5):
                await consumer
            assert registry.statistics().tasks == 0
            assert await observer.instances(service, passing_only=False) == []
            with pytest.raises(RegistryError, match="closed"):
                await registry.register(make_instance(service, 9))
        assert len(asyncio.all_tasks()) == tasks_before, asyncio.all_tasks()

    async def test_invalid_names_and_times_are_rejected(
        self, registry_backend: RegistryBackend, service: str
    ) -> None:
        """Bad instance ids, service names and a heartbeat slower than TTL/3 are refused."""
        with pytest.raises(ConfigurationError, match="instance id"):
            ServiceInstance(service=service, instance_id="a/b")
        with pytest.raises(ConfigurationError, match="service name"):
            ServiceInstance(service="no spaces", instance_id="a")
        async with registry_backend.registries() as (registry,):
            with pytest.raises(ConfigurationError, match="ttl/3"):
                await registry.register(make_instance(service), ttl=3.0, interval=1.5)
            assert await registry.instances(service) == []
        async with registry_backend.registries(ttl=3.0, probe_timeout=0.6) as (registry,):
            with pytest.raises(ConfigurationError, match="probe_timeout"):
                await registry.register(make_instance(service), probe=lambda: True)


async def _drain(watch: Watch) -> None:
    async for _ in watch:
        pass
