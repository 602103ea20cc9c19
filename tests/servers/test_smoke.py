"""Smoke tests for the real-server launchers and the pytest fixtures of `loom_ha.testing.plugin`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid

import nats
import pytest
import redis.asyncio as aioredis

from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import (
    ConsulAgent,
    ConsulCluster,
    NatsCluster,
    NatsServer,
    RedisSentinelCluster,
    RedisServer,
    ServerNotReadyError,
    ServerProcess,
    find_server_binary,
)


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _pids(*handles: ServerProcess) -> list[int]:
    pids = [h.pid for h in handles]
    assert None not in pids
    return [pid for pid in pids if pid is not None]


# -- session fixtures ---------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_server_answers_ping(redis_server: RedisServer) -> None:
    """The session redis-server answers PING from redis-py at its advertised URL."""
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


@pytest.mark.redis
def test_redis_sentinels_agree_on_replicated_master(redis_sentinel: RedisSentinelCluster) -> None:
    """All sentinels name the same master, and both replicas have a live link to it."""
    masters = {sentinel.master_address() for sentinel in redis_sentinel.sentinels}
    assert masters == {redis_sentinel.master_address()}
    master = redis_sentinel.master()
    assert master.info()["role"] == "master"
    replicas = [s for s in redis_sentinel.servers if s is not master]
    assert len(replicas) == 2
    for replica in replicas:
        info = replica.info()
        assert (info["role"], info["master_link_status"]) == ("slave", "up")
    assert redis_sentinel.url.endswith(f"/{redis_sentinel.master_name}")
    assert len(redis_sentinel.sentinel_addresses) == 3


@pytest.mark.nats
async def test_nats_server_delivers_a_message(nats_server: NatsServer) -> None:
    """A message published on the session nats-server reaches a subscriber."""
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    try:
        subject = f"smoke.{uuid.uuid4().hex}"
        sub = await nc.subscribe(subject)
        await nc.publish(subject, b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"
    finally:
        await nc.close()


@pytest.mark.nats
async def test_nats_cluster_replicates_a_jetstream_stream(nats_cluster: NatsCluster) -> None:
    """The session cluster is fully routed and acks a publish to an R3 JetStream stream."""
    names = {node.server_name for node in nats_cluster.nodes}
    for node in nats_cluster.nodes:
        assert node.route_peers() == names - {node.server_name}
    nc = await nats.connect(servers=nats_cluster.servers, allow_reconnect=False)
    try:
        js = nc.jetstream()
        name = f"SMOKE_{uuid.uuid4().hex}"
        await js.add_stream(name=name, subjects=[f"{name}.>"], num_replicas=3)
        try:
            ack = await js.publish(f"{name}.one", b"payload")
            assert (ack.stream, ack.seq) == (name, 1)
        finally:
            await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.mark.consul
def test_consul_agent_registers_a_service(consul_agent: ConsulAgent) -> None:
    """The dev agent is its own leader and serves back a service registered through its API."""
    assert consul_agent.leader() is not None
    service_id = f"smoke-{uuid.uuid4().hex}"
    registration = {"Name": "smoke", "ID": service_id, "Address": "127.0.0.1", "Port": 1234}
    consul_agent.api("agent/service/register", method="PUT", payload=registration)
    try:
        services = consul_agent.api("agent/services")
        assert isinstance(services, dict)
        assert services[service_id]["Port"] == 1234
    finally:
        consul_agent.api(f"agent/service/deregister/{service_id}", method="PUT")


@pytest.mark.consul
def test_consul_cluster_elected_one_leader(consul_cluster: ConsulCluster) -> None:
    """Every server of the session cluster names the same leader, which is one of them."""
    leaders = {member.leader() for member in consul_cluster.members}
    assert leaders == {consul_cluster.leader()}
    assert consul_cluster.leader_member().alive


# -- chaos: private instances -------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.chaos
def test_redis_restart_forgets_data_and_pause_blocks(server_launcher: ServerLauncher) -> None:
    """A restarted non-persistent Redis comes back empty; a paused one stops answering."""
    server = server_launcher.redis()
    port, pid = server.port, server.pid
    server.command("SET", "key", "value")
    server.restart()
    assert (server.port, server.command("GET", "key")) == (port, None)
    assert server.pid != pid
    server.pause()
    with pytest.raises(OSError):
        server.command("PING", timeout=0.3)
    server.resume()
    assert server.command("PING") == "PONG"


@pytest.mark.redis
@pytest.mark.chaos
def test_redis_sentinel_fails_over_a_killed_master(server_launcher: ServerLauncher) -> None:
    """Killing the master makes the sentinels promote a replica that the other replica follows."""
    cluster = server_launcher.redis_sentinel()
    old = cluster.master()
    old.kill()
    assert not old.alive
    new = cluster.wait_for_failover(old.address)
    assert new is not old
    assert new.info()["role"] == "master"


@pytest.mark.nats
@pytest.mark.chaos
def test_nats_cluster_node_rejoins_after_kill(server_launcher: ServerLauncher) -> None:
    """A killed cluster node restarts on its old ports and routes to both peers again."""
    cluster = server_launcher.nats_cluster()
    leader = cluster.meta_leader()
    victim = next(node for node in cluster.nodes if node is not leader)
    url = victim.url
    victim.kill()
    assert not victim.alive
    victim.start()
    cluster.wait_ready()
    assert victim.url == url
    assert victim.route_peers() == {node.server_name for node in cluster.nodes} - {
        victim.server_name
    }


@pytest.mark.consul
@pytest.mark.chaos
def test_consul_cluster_survives_losing_its_leader(server_launcher: ServerLauncher) -> None:
    """After the leader is killed the two others elect a new one, and the old one rejoins."""
    cluster = server_launcher.consul_cluster()
    old = cluster.leader_member()
    old.kill()
    cluster.wait_ready()
    assert cluster.leader_member() is not old
    old.start()
    cluster.wait_ready()
    assert old.leader() == cluster.leader()


@pytest.mark.redis
@pytest.mark.nats
@pytest.mark.consul
def test_stop_leaves_no_process_behind() -> None:
    """After stop(), even of a paused server, none of the launched pids exists any more."""
    with RedisServer() as redis_server, NatsServer(jetstream=True) as nats_server:
        with ConsulAgent() as consul:
            pids = _pids(redis_server, nats_server, consul)
            nats_server.pause()
        with NatsCluster(3) as cluster:
            pids += _pids(*cluster.nodes)
            cluster.nodes[1].pause()
    _assert_gone(pids)
    assert not redis_server.alive and not nats_server.alive


def test_find_server_binary_names_the_install_script(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing binary raises FileNotFoundError that says to run scripts/install-servers."""
    monkeypatch.setenv("LOOM_HA_BIN_DIR", "/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"no-such-server.*scripts/install-servers"):
        find_server_binary("no-such-server")


def test_missing_binary_fails_instead_of_skipping() -> None:
    """The plugin turns a launcher's FileNotFoundError into a test failure, never a skip."""

    class Missing:
        stopped = False

        def start(self) -> None:
            raise FileNotFoundError("redis-server not found: run scripts/install-servers")

        def stop(self) -> None:
            self.stopped = True

    launcher = Missing()
    with contextlib.ExitStack() as stack, pytest.raises(pytest.fail.Exception, match="install"):
        ServerLauncher(stack).start(launcher)
    assert launcher.stopped


async def test_launchers_do_not_import_client_libraries() -> None:
    """Importing the launchers pulls in no Redis, NATS or Consul client library."""
    code = (
        "import sys, loom_ha.testing.servers, loom_ha.testing.plugin;"
        "bad = [m for m in ('redis', 'nats', 'consul', 'aiohttp') if m in sys.modules];"
        "sys.exit(str(bad) if bad else 0)"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await proc.wait() == 0


@pytest.mark.redis
async def test_redis_tls_with_acl_user(server_launcher: ServerLauncher) -> None:
    """A TLS Redis with an ACL user accepts redis-py over rediss:// trusting only its test CA."""
    server = server_launcher.redis(tls=True, username="loom", password="s3cret pass")
    assert server.url.startswith("rediss://loom:")
    client = aioredis.from_url(server.url, ssl_ca_certs=str(server.ca_file))
    try:
        assert await client.ping() is True
        assert await client.acl_whoami() == "loom"
    finally:
        await client.aclose()


@pytest.mark.nats
async def test_nats_tls_with_user_password(server_launcher: ServerLauncher) -> None:
    """A TLS nats-server with user/password accepts nats-py using the server's test CA."""
    server = server_launcher.nats(jetstream=False, user="loom", password="s3cret", tls=True)
    nc = await nats.connect(server.url, tls=server.ssl_context(), allow_reconnect=False)
    try:
        await nc.flush()
        assert nc.is_connected
    finally:
        await nc.close()


@pytest.mark.redis
def test_readiness_failure_reports_the_log_tail() -> None:
    """A server that cannot start raises ServerNotReadyError quoting its own log."""
    server = RedisServer(extra_config=["no-such-directive yes"])
    with pytest.raises(ServerNotReadyError, match="no-such-directive"):
        server.start()
    assert not server.alive
    server.stop()
