"""`loom-ha status`: the table of services, instances, health and heartbeats from a registry URL."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from loom_ha.cli import main
from loom_ha.cli.status import run_status
from loom_ha.discovery import Health
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.discovery.redis import RedisRegistry
from loom_ha.testing.servers import ConsulAgent, RedisServer

from .conftest import consul_url, instance


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=220, color_system=None), out


@pytest.mark.consul
async def test_status_lists_consul_instances_with_health(
    consul_agent: ConsulAgent, service: str
) -> None:
    """The table shows each instance of the service with its health, heartbeat age and note."""
    async with ConsulRegistry(consul_url(consul_agent), ttl=3.0) as registry:
        await registry.register(instance(service, 0))
        sick = await registry.register(instance(service, 1, weight=5))
        await sick.set_health(Health.CRITICAL, "queue full")
        console, out = _console()
        code = await run_status(console, consul_url(consul_agent), service=service)
    text = out.getvalue()
    print(text)
    assert code == 0
    lines = {line.split("│")[2].strip(): line for line in text.splitlines() if service in line}
    assert "passing" in lines["inst-0"] and "s ago" in lines["inst-0"]
    assert "critical" in lines["inst-1"] and "queue full" in lines["inst-1"]
    assert "redis://127.0.0.1:6301" in lines["inst-1"] and "│ 5 " in lines["inst-1"]
    assert "2 instances, 1 passing" in text


@pytest.mark.redis
async def test_status_lists_redis_instances(redis_server: RedisServer, service: str) -> None:
    """The same table is built from a Redis registry."""
    async with RedisRegistry(redis_server.url) as registry:
        await registry.register(instance(service, 0))
        console, out = _console()
        code = await run_status(console, redis_server.url)
    assert code == 0
    assert service in out.getvalue() and "passing" in out.getvalue()


@pytest.mark.consul
def test_status_command_line(
    consul_agent: ConsulAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loom-ha status URL` prints instances registered by any client, and fails cleanly."""
    monkeypatch.setenv("COLUMNS", "200")
    consul_agent.api(
        "agent/service/register",
        method="PUT",
        payload={
            "Name": "cli-status-svc",
            "ID": "cli-status-svc:node-a",
            "Meta": {"loom_instance": "node-a", "loom_address": "nats://10.0.0.1:4222"},
            "Check": {
                "CheckID": "loom-ha:cli-status-svc:node-a",
                "TTL": "30s",
                "Status": "passing",
            },
        },
    )
    try:
        assert main(["status", consul_url(consul_agent), "--service", "cli-status-svc"]) == 0
        shown = capsys.readouterr().out
        assert "node-a" in shown and "nats://10.0.0.1:4222" in shown and "passing" in shown
    finally:
        consul_agent.api("agent/service/deregister/cli-status-svc:node-a", method="PUT")
    assert main(["status", "memory://"]) == 2
    assert main(["status", "consul://127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert "unavailable" in capsys.readouterr().out
