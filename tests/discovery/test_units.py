"""Backend-independent behaviour: index rules, URL parsing, stale serving, instance validation."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest
from typing_extensions import override

from loom_ha.discovery import (
    Health,
    MemoryRegistry,
    ServiceInstance,
    ServiceRegistry,
    open_registry,
)
from loom_ha.discovery.consul import ConsulRegistry, parse_consul_address, parse_heartbeat_output
from loom_ha.discovery.watch import next_index
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError
from loom_ha.retry import backoff_delay
from loom_ha.testing.registry_conformance import eventually

from .conftest import instance


def test_next_index_follows_consul_rules() -> None:
    """An index that goes backwards resets to 0; an index below 1 is never blocked on."""
    assert next_index(0, 12) == 12
    assert next_index(12, 12) == 12
    assert next_index(12, 40) == 40
    assert next_index(40, 7) == 0  # went backwards: full answer next
    assert next_index(0, 0) == 1  # never block on 0 (it would return at once, forever)


def test_backoff_is_jittered_and_capped() -> None:
    """Backoff delays grow, stay within [ceiling/2, ceiling] and never pass the cap."""
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
        delay = backoff_delay(attempt, initial=0.1, cap=2.0)
        assert ceiling / 2 <= delay <= ceiling


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("consul://10.1.2.3:8501", ("http", "10.1.2.3", 8501)),
        ("consul://consul.local", ("http", "consul.local", 8500)),
        ("consul+https://c:8501/", ("https", "c", 8501)),
        ("http://127.0.0.1:1234", ("http", "127.0.0.1", 1234)),
    ],
)
def test_consul_url_forms(url: str, expected: tuple[str, str, int]) -> None:
    """consul://, consul+https:// and http(s):// URLs give scheme, host and port."""
    assert parse_consul_address(url) == expected


@pytest.mark.parametrize(
    "url", ["redis://h:1", "consul://", "consul://h:notaport", "consul://h:1/path", "h:1"]
)
def test_bad_consul_url_is_named(url: str) -> None:
    """A URL that is not a Consul address raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="Consul URL"):
        ConsulRegistry(url)


def test_consul_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONSUL_HTTP_ADDR, CONSUL_HTTP_SSL and CONSUL_HTTP_TOKEN apply when no argument is given."""
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.9.8.7:8600")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cr3t")
    registry = ConsulRegistry()
    assert (registry.scheme, registry.host, registry.port) == ("http", "10.9.8.7", 8600)
    assert registry.token == "s3cr3t"
    assert ConsulRegistry("consul://h:1", token="explicit").token == "explicit"
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    assert parse_consul_address() == ("https", "10.9.8.7", 8600)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://[bad")
    with pytest.raises(ConfigurationError, match="CONSUL_HTTP_ADDR"):
        ConsulRegistry()


def test_open_registry_dispatches_on_scheme() -> None:
    """open_registry() picks the backend by URL scheme and names an unknown scheme."""
    assert isinstance(open_registry("memory://"), MemoryRegistry)
    assert isinstance(open_registry("consul://h:1"), ConsulRegistry)
    with pytest.raises(ConfigurationError, match="zookeeper"):
        open_registry("zookeeper://h:2181")
    for mistyped in ("consol://s3cret@h:8500", "s3cret@h:8500"):  # the scheme, never the token
        with pytest.raises(ConfigurationError) as caught:
            open_registry(mistyped)
        assert "s3cret" not in str(caught.value)


def test_heartbeat_output_round_trips() -> None:
    """The check output carries the heartbeat time and the health note."""
    assert parse_heartbeat_output("loom-ha heartbeat 1700000000.250; db down") == (
        1700000000.25,
        "db down",
    )
    assert parse_heartbeat_output("TTL expired") == (None, "TTL expired")


def test_instance_is_frozen_and_validated() -> None:
    """ServiceInstance copies and freezes its meta, derives transport, and rejects bad values."""
    meta = {"version": "2"}
    inst = ServiceInstance(service="agent_1", instance_id="a", address="nats://h:4222", meta=meta)
    meta["version"] = "3"
    assert inst.version == "2" and inst.transport == "nats"
    with pytest.raises(TypeError):
        inst.meta["x"] = "y"  # type: ignore[index]
    with pytest.raises(ConfigurationError, match="weight"):
        ServiceInstance(service="s", instance_id="a", weight=0)
    with pytest.raises(ConfigurationError, match="meta key"):
        ServiceInstance(service="s", instance_id="a", meta={"bad key": "v"})


async def test_consul_client_raises_no_deprecation_warning() -> None:
    """Building and closing the py-consul/aiohttp client emits no DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry = ConsulRegistry("consul://127.0.0.1:1", timeout=0.5)
        with pytest.raises(RegistryUnavailableError):
            await registry.instances("anything")
        await registry.close()


class ScriptedRegistry(MemoryRegistry):
    """A memory registry whose queries can be made to fail or return a chosen index."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.down = False
        self.index_override: list[int] = []
        self.asked: list[int] = []

    @override
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]:
        self.asked.append(index)
        if self.down:
            raise RegistryUnavailableError("scripted outage")
        got, found = await super()._query(service, index, wait)
        return (self.index_override.pop(0) if self.index_override else got), found


async def test_watch_resets_index_that_goes_backwards(service: str) -> None:
    """After an answer with a smaller index the watch asks again from index 0."""
    async with ScriptedRegistry(watch_wait=0.2) as registry, registry.watch(service) as watch:
        await anext(watch)
        registry.index_override = [1_000_000, 3]
        await registry.register(instance(service, 0))
        await anext(watch)  # answered with the (fake) index 1,000,000
        # The query loop runs on its own: the next answer (3, backwards) comes with the
        # next change or after watch_wait, and the query after it asks from 0.
        await registry.register(instance(service, 1))
        await anext(watch)

        async def asked_again_from_zero() -> bool:
            after = registry.asked[registry.asked.index(1_000_000) + 1 :]
            return 0 in after

        await eventually(asked_again_from_zero, within=5, what="a query from index 0")
        after = registry.asked[registry.asked.index(1_000_000) + 1 :]
        assert after[: after.index(0)] == [1_000_000] * after.index(0)
        await registry.register(instance(service, 2))
        snap = await anext(watch)
        assert snap.ids == ["inst-0", "inst-1", "inst-2"]


async def test_outage_serves_last_snapshot_marked_stale(service: str) -> None:
    """While the backend is down, watch and instances() serve the last snapshot marked stale."""
    async with ScriptedRegistry(watch_wait=0.2) as registry:
        await registry.register(instance(service, 0))
        async with registry.watch(service) as watch:
            fresh = await anext(watch)
            registry.down = True
            stale = await anext(watch)
            assert stale.stale and stale.ids == fresh.ids and "scripted outage" in str(stale.error)
            snap = await registry.snapshot(service)
            assert snap.stale and snap.ids == ["inst-0"]
            assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]
            registry.down = False
            back = await asyncio.wait_for(anext(watch), 5)
            assert not back.stale and back.ids == ["inst-0"]
        with pytest.raises(RegistryUnavailableError):
            registry.down = True
            await registry.snapshot("never-read")


async def test_registry_error_ends_the_watch(service: str) -> None:
    """A non-transient error (e.g. an ACL denial) is raised to the consumer and ends the watch."""

    class Denied(MemoryRegistry):
        @override
        async def _query(
            self, service: str, index: int, wait: float
        ) -> tuple[int, list[ServiceInstance]]:
            raise RegistryError("permission denied")

    async with Denied() as registry:
        watch = registry.watch(service)
        with pytest.raises(RegistryError, match="denied"):
            await anext(watch)
        assert registry.statistics().watches == 0


async def test_critical_memory_instance_is_reaped_after_deregister_after(service: str) -> None:
    """An expired memory instance stays critical, then is removed after deregister_after."""
    # The critical spell lasts deregister_after: 2 s for one of the 20 ms polls below to
    # land in, so only a stall longer than that could skip it (it was 0.3 s).
    registry: ServiceRegistry = MemoryRegistry(ttl=0.3, deregister_after=2.0)
    other = MemoryRegistry(registry.store)  # type: ignore[attr-defined]
    await registry.register(instance(service))
    await registry.close(deregister=False)

    async def listed(*health: Health) -> bool:
        found = await other.instances(service, passing_only=False)
        return [i.health for i in found] == list(health)

    # Each bound is the mechanism's delay (TTL 0.3 s, then deregister_after 2 s) plus
    # seconds of margin; an instance reaped at expiry is never seen critical and fails here.
    await eventually(lambda: listed(Health.CRITICAL), within=5, what="listed critical")
    await eventually(lambda: listed(), within=10, what="reaped")
    await other.close()


async def test_a_round_reports_at_most_so_many_changes(service: str) -> None:
    """When more instances change than a round may report, the rest follow in the next round."""
    from loom_ha.discovery.heartbeat import REPORTS_PER_ROUND

    class Recording(MemoryRegistry):
        def __init__(self) -> None:
            super().__init__(ttl=1.5)
            self.reported: list[int] = []

        @override
        async def _pulse_all(
            self, instances: Any, changed: Any, ttl: float
        ) -> list[ServiceInstance]:
            self.reported.append(len(changed))
            return await super()._pulse_all(instances, changed, ttl)

    count = REPORTS_PER_ROUND + REPORTS_PER_ROUND // 2
    async with Recording() as registry:
        for n in range(count):  # every probe fails: every instance changes at the first round
            await registry.register(instance(service, n), probe=lambda: False)

        async def all_reported() -> bool:
            return sum(registry.reported) >= count

        # Bound: a round every 0.5 s, two needed; the rest is margin for a loaded machine.
        await eventually(all_reported, within=10, what="every change reported")
        assert max(registry.reported) == REPORTS_PER_ROUND
        assert sum(registry.reported) == count  # each change reported once, none lost
        critical = await registry.instances(service, passing_only=False)
        assert len(critical) == count and not any(i.passing for i in critical)
