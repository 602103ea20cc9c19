"""ConsulRegistry against a Consul agent that enforces ACLs (default deny): a policy-limited
token works from every source, a missing, wrong or too-weak token is one clear error, and
the token is never shown."""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import Iterator

import pytest
from rich.console import Console

from loom_ha._tasks import TaskSupervisor
from loom_ha.cli.status import run_status
from loom_ha.discovery import ServiceRegistry, open_registry
from loom_ha.discovery.consul import ConsulRegistry, acl_rules, parse_consul_address
from loom_ha.errors import ConfigurationError, RegistryError, TransientError
from loom_ha.routing.directory import InstanceDirectory
from loom_ha.testing.registry_conformance import eventually, next_snapshot
from loom_ha.testing.servers import ConsulAgent

from .conftest import instance

TTL = 1.5


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[ConsulAgent]:
    """A dev agent enforcing ACLs (default deny), shared by this module's tests."""
    with ConsulAgent(acl=True, name="consul-acl") as agent:
        yield agent


def _url(agent: ConsulAgent, token: str | None = None, *, query: bool = False) -> str:
    if token is None:
        return f"consul://{agent.address}"
    return (
        f"consul://{agent.address}?token={token}" if query else f"consul://{token}@{agent.address}"
    )


def _passing(agent: ConsulAgent, service: str) -> list[str]:
    """Instance ids passing in the catalog, read with the management token."""
    entries = agent.api(f"health/service/{service}?passing=1")
    assert isinstance(entries, list)
    return sorted(e["Service"]["Meta"]["loom_instance"] for e in entries)


@pytest.mark.consul
@pytest.mark.parametrize("source", ["argument", "environment", "url-userinfo", "url-query"])
async def test_policy_limited_token_registers_beats_and_watches(
    acl_agent: ConsulAgent, service: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only `acl_rules(register=[service])`, from any token source: registration,
    heartbeats, a watch and deregistration all work on an agent that denies by default."""
    token = await asyncio.to_thread(acl_agent.create_token, acl_rules(register=[service]))
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    registry: ServiceRegistry
    if source == "argument":
        registry = ConsulRegistry(_url(acl_agent), token=token, ttl=TTL)
    elif source == "environment":
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
        registry = ConsulRegistry(_url(acl_agent), ttl=TTL)
    else:
        url = _url(acl_agent, token, query=source == "url-query")
        registry = open_registry(url, ttl=TTL)  # the form LOOM_HA_REGISTRY takes
    async with registry, registry.watch(service) as watch:
        await next_snapshot(watch, lambda s: s.ids == [])
        registration = await registry.register(instance(service, 0))
        await next_snapshot(watch, lambda s: s.ids == ["inst-0"])

        async def beating() -> bool:
            return registry.statistics().heartbeat_rounds >= 3

        await eventually(beating, within=10, what="three heartbeat rounds")
        assert registry.statistics().heartbeat_failures == 0
        assert await asyncio.to_thread(_passing, acl_agent, service) == ["inst-0"]
        await registration.deregister()
        await next_snapshot(watch, lambda s: s.ids == [])


def _one_error(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors loom-ha logged (a retry loop would log one per attempt)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def _idle_rounds() -> None:
    """Let two heartbeat intervals pass: a retry loop would have logged by then."""
    await asyncio.sleep(2 * TTL / 3 + 0.1)


@pytest.mark.consul
async def test_missing_token_is_one_clear_error(
    acl_agent: ConsulAgent,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No token: registering says which permission is missing and that no token was given;
    a watch says it may not read the service (Consul alone would show it empty); nothing is
    retried."""
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    caplog.set_level(logging.WARNING, logger="loom_ha")
    async with ConsulRegistry(_url(acl_agent), ttl=TTL) as registry:
        with pytest.raises(RegistryError, match="no ACL token was given") as raised:
            await registry.register(instance(service, 0))
        # The first write is the process heartbeat's (acl_rules grants both).
        assert "Missing service:write on loom-ha-heartbeat" in str(raised.value)
        assert not isinstance(raised.value, TransientError)
        with pytest.raises(RegistryError, match=f"Missing service:read on {service}"):
            await registry.instances(service)
        watch = registry.watch(service)
        with pytest.raises(RegistryError, match="no ACL token was given"):
            await anext(watch)
        await _idle_rounds()
        stats = registry.statistics()
    assert _one_error(caplog) == []
    assert stats.registrations == 0 and stats.heartbeat_failures == 0


@pytest.mark.consul
async def test_wrong_token_is_one_clear_error(
    acl_agent: ConsulAgent, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A token Consul does not know: register, instances() and a watch each raise one
    non-retryable error saying so; no heartbeat keeps trying."""
    caplog.set_level(logging.WARNING, logger="loom_ha")
    wrong = str(uuid.uuid4())
    async with ConsulRegistry(_url(acl_agent), token=wrong, ttl=TTL) as registry:
        with pytest.raises(RegistryError, match="does not know the ACL token") as raised:
            await registry.register(instance(service, 0))
        assert not isinstance(raised.value, TransientError)
        with pytest.raises(RegistryError, match="does not know the ACL token"):
            await registry.instances(service)
        async with registry.watch(service) as watch:
            with pytest.raises(RegistryError, match="does not know the ACL token"):
                await anext(watch)
        await _idle_rounds()
        stats = registry.statistics()
    assert _one_error(caplog) == []
    assert stats.registrations == 0 and stats.heartbeat_failures == 0


@pytest.mark.consul
async def test_token_lacking_a_permission_names_it(acl_agent: ConsulAgent, service: str) -> None:
    """A token allowed to register `service` only: registering or watching another service
    is refused with the missing permission named, while `service` itself keeps working."""
    other = f"{service}-other"
    token = await asyncio.to_thread(acl_agent.create_token, acl_rules(register=[service]))
    async with ConsulRegistry(_url(acl_agent), token=token, ttl=TTL) as registry:
        await registry.register(instance(service, 0))
        with pytest.raises(RegistryError, match="lacks this permission") as raised:
            await registry.register(instance(other, 0))
        assert f"Missing service:write on {other}" in str(raised.value)
        async with registry.watch(other) as watch:
            with pytest.raises(RegistryError, match=f"Missing service:read on {other}"):
                await anext(watch)
        assert [i.instance_id for i in await registry.instances(service)] == ["inst-0"]
        assert registry.statistics().registrations == 1


@pytest.mark.consul
async def test_read_only_token_watches_but_cannot_register(
    acl_agent: ConsulAgent, service: str
) -> None:
    """`acl_rules(read=[...])` is enough to watch and list a service, not to register in it."""
    writer = await asyncio.to_thread(acl_agent.create_token, acl_rules(register=[service]))
    reader = await asyncio.to_thread(acl_agent.create_token, acl_rules(read=[f"{service}*"]))
    async with (
        ConsulRegistry(_url(acl_agent), token=writer, ttl=TTL) as mine,
        ConsulRegistry(_url(acl_agent), token=reader, ttl=TTL) as theirs,
        theirs.watch(service) as watch,
    ):
        await mine.register(instance(service, 0))
        await next_snapshot(watch, lambda s: s.ids == ["inst-0"])
        assert service in await theirs.services()
        with pytest.raises(RegistryError, match="Missing service:write"):
            await theirs.register(instance(service, 1))


@pytest.mark.consul
async def test_token_is_never_shown(
    acl_agent: ConsulAgent, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The token (from the URL) appears in no repr, statistics, exception text, log line or
    `loom-ha status` output, whether things work or are refused."""
    caplog.set_level(logging.DEBUG)
    token = await asyncio.to_thread(acl_agent.create_token, acl_rules(register=[service]))
    texts: list[str] = []

    def keep(exc: BaseException) -> None:
        while exc is not None:  # the whole chain: what a traceback would print
            texts.extend([str(exc), repr(exc)])
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]

    registry = open_registry(_url(acl_agent, token), ttl=TTL)
    async with registry, registry.watch(service) as watch:
        await registry.register(instance(service, 0))
        await next_snapshot(watch, lambda s: s.ids == ["inst-0"])
        for refused in (registry.register(instance(f"{service}-x", 0)), registry.instances("x")):
            try:
                await refused
            except RegistryError as exc:
                keep(exc)
        texts += [repr(registry), str(registry.statistics()), repr(registry.registrations)]
        console = Console(file=io.StringIO(), width=300)
        assert await run_status(console, _url(acl_agent, token, query=True), service=service) == 0
        status = console.file.getvalue()  # type: ignore[attr-defined]
    for bad in (f"consul://{token}@h:1/path", f"consul://h:1?token={token}&dc=x"):
        try:
            ConsulRegistry(bad)
        except ConfigurationError as exc:
            keep(exc)
    assert "inst-0" in status and len(texts) >= 8  # every kind above was captured
    texts += [status, *(r.getMessage() for r in caplog.records)]
    assert [t for t in texts if token in t] == []


def test_token_url_forms() -> None:
    """A token in the URL (userinfo or ?token=) is the registry's token; an explicit token=
    wins over it, and it wins over CONSUL_HTTP_TOKEN; two tokens or a password are refused."""
    assert ConsulRegistry("consul://s3cr3t@h:1").token == "s3cr3t"
    assert ConsulRegistry("consul+https://h:1/?token=s3cr3t").token == "s3cr3t"
    assert ConsulRegistry("consul://a%40b@h:1").token == "a@b"
    assert ConsulRegistry("consul://s3cr3t@h:1", token="explicit").token == "explicit"
    assert parse_consul_address("consul://s3cr3t@h:1") == ("http", "h", 1)
    for bad in ("consul://one@h:1?token=two", "consul://user:s3cr3t@h:1", "consul://h:1?tok=x"):
        with pytest.raises(ConfigurationError, match="Consul URL") as raised:
            ConsulRegistry(bad)
        assert "s3cr3t" not in str(raised.value) and "two" not in str(raised.value)


def test_token_url_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONSUL_HTTP_TOKEN applies only when neither token= nor the URL gives one."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert ConsulRegistry("consul://from-url@h:1").token == "from-url"
    assert ConsulRegistry("consul://h:1").token == "from-env"
    assert ConsulRegistry("consul://h:1", token="").token is None  # explicitly none


def test_acl_rules_cover_the_heartbeat_service() -> None:
    """Registering needs write on the heartbeat service too; reading never does."""
    rules = acl_rules(register=["orders", "billing-*"], read=["stock"])
    assert 'service "loom-ha-heartbeat" { policy = "write" }' in rules
    assert 'service "orders" { policy = "write" }' in rules
    assert 'service_prefix "billing-" { policy = "write" }' in rules
    assert 'service "stock" { policy = "read" }' in rules
    assert 'node_prefix "" { policy = "read" }' in rules
    assert "heartbeat" not in acl_rules(read=["stock"])


@pytest.mark.consul
async def test_routing_directory_reports_a_denied_watch_once(
    acl_agent: ConsulAgent, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Routing's directory of a service the token may not read: one error naming the missing
    permission, then quiet retries (a policy granted later still takes effect), no instances."""
    token = await asyncio.to_thread(acl_agent.create_token, acl_rules(read=["other"]))
    registry = open_registry(_url(acl_agent, token))
    tasks = TaskSupervisor("test")
    directory = InstanceDirectory(registry, tasks, first_answer=0.5)
    try:
        caplog.set_level(logging.ERROR, logger="loom_ha.routing")
        assert await directory.instances(service) == ()
        await asyncio.sleep(3.5)  # several retries: backoff 0.1 s doubling, capped at 5 s
    finally:
        await tasks.aclose()
        await registry.close()
    denials = [r for r in caplog.records if service in r.getMessage()]
    assert len(denials) == 1, [r.getMessage() for r in denials]
    assert "read" in denials[0].getMessage()
