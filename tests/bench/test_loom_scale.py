"""`loom-ha bench --transport loom-scale` in small: routed Loom nodes in worker processes.

The figures go to docs/benchmarks.md; here the run is checked for what must hold at any
size: every call answered, every node served, every request routed, no worker left behind
(the conftest fails a test that leaves a child process running).
"""

from __future__ import annotations

import pytest

from loom_ha.bench.loom_scale import run_loom_scale
from loom_ha.errors import RegistryError
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import ConsulAgent, NatsServer, RedisServer


async def _small(registry: str, broker: str) -> None:
    [result] = await run_loom_scale(
        [registry],
        broker=broker,
        duration=2.0,
        node_processes=2,
        nodes_per_process=5,
        client_processes=1,
        concurrency=8,
        # Round robin over nodes called in turn: every instance of every node gets calls.
        balancer="round_robin",
    )
    assert result.visible == result.nodes == 10
    assert result.sent > 0 and result.lost == 0, (result.errors, result.first_error)
    assert result.wrong == 0 and result.errors == {} and result.handler_errors == 0
    assert result.answering == 10, result.handled
    assert result.routing["routed"] == result.sent and result.routing["unrouted"] == 0
    assert result.heartbeat_failures == 0
    assert len(result.latencies_ms) == result.sent


@pytest.mark.nats
@pytest.mark.consul
# 3 fresh worker processes (each imports loom, nats-py, py-consul) on a loaded 2-core box.
@pytest.mark.timeout(90)
async def test_routed_loom_nodes_through_consul_answer_every_call(
    nats_server: NatsServer, consul_agent: ConsulAgent
) -> None:
    """2 node processes x 5 nodes registered in Consul, 1 client: nothing lost, all served."""
    await _small(f"consul://{consul_agent.address}", nats_server.url)


@pytest.mark.nats
@pytest.mark.redis
@pytest.mark.timeout(90)  # as above
async def test_routed_loom_nodes_through_the_redis_registry_answer_every_call(
    nats_server: NatsServer, redis_server: RedisServer
) -> None:
    """The same run with the Redis registry: nothing lost, all served."""
    await _small(redis_server.url, nats_server.url)


@pytest.mark.nats
@pytest.mark.timeout(90)  # as above
async def test_a_failed_run_stops_every_worker(nats_server: NatsServer) -> None:
    """A registry nobody answers fails the run with the registry's error, workers stopped."""
    with pytest.raises(RegistryError):
        await run_loom_scale(
            ["redis://127.0.0.1:1/0"],
            broker=nats_server.url,
            duration=1.0,
            node_processes=2,
            nodes_per_process=2,
            client_processes=1,
        )


@pytest.mark.consul
def test_the_agent_takes_the_connection_limit_the_bench_gives(
    server_launcher: ServerLauncher,
) -> None:
    """`ConsulAgent(hcl=...)` reaches the agent: how the bench lifts its per-client limit."""
    limit = "limits { http_max_conns_per_client = 321 }"
    agent = server_launcher.start(ConsulAgent(log_level="info", hcl=[limit]))
    config = agent.api("agent/self")
    assert isinstance(config, dict)
    assert config["DebugConfig"]["HTTPMaxConnsPerClient"] == 321
