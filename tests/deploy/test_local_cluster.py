"""`loom-ha up` / `loom-ha down`: real brokers, Consul and app instances as local processes.

Every test drives the installed `loom-ha` command in a subprocess, like a user would, and checks
the processes and servers from outside (pids in /proc, RESP, NATS, Consul's HTTP API).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from loom_ha.testing import local_cluster as lc
from loom_ha.testing._net import http_get_json, resp_command
from loom_ha.testing.local_cluster import ClusterState, load_state

from ._hcl import loads as load_hcl
from .test_deploy_files import CONFIG, CONSUL, _conf_lines, _conf_value, _env, _services

_SCRIPT = Path(sys.executable).parent / "loom-ha"
_MAIN = "import sys; from loom_ha.cli import main; sys.exit(main())"


def _cli(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run `loom-ha ARGS` as a user would; output is captured as text."""
    argv = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-c", _MAIN]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _running(pid: int) -> bool:
    """True while `pid` runs; an exited but unreaped process (zombie) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir for `up`; whatever a failed test leaves running is stopped afterwards."""
    root = tmp_path / "cluster"
    yield root
    if (root / lc.STATE_FILE).exists():
        _cli("down", "--dir", str(root), "--grace", "2")


def _up(root: Path, stack: str, instances: int) -> ClusterState:
    result = _cli("up", "--stack", stack, "--instances", str(instances), "--dir", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    state = load_state(root)
    assert state is not None and state.status == "running"
    client = state.client_env
    assert f"export LOOM_TRANSPORT={client['LOOM_TRANSPORT']}" in result.stdout.replace("'", "")
    assert [p.pid for p in state.processes if not _running(p.pid)] == []
    instances_env = [p.env for p in state.processes if p.role == "loom instance"]
    assert [env["LOOM_HA_INSTANCE_ID"] for env in instances_env] == [
        f"{stack}-{n}" for n in range(1, instances + 1)
    ]
    for env in instances_env:
        assert env["LOOM_TRANSPORT"] == client["LOOM_TRANSPORT"]
        assert env.get("LOOM_HA_REGISTRY") == client.get("LOOM_HA_REGISTRY")
        assert env["LOOM_NODE_ID"] == lc.NODE_ID
    for record in state.processes:
        assert Path(record.log).is_relative_to(root)
    return state


def _down_and_check(root: Path, state: ClusterState) -> None:
    result = _cli("down", "--dir", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Stopped {len(state.processes)} process(es)" in result.stdout
    assert [p.pid for p in state.processes if _running(p.pid)] == []
    assert not root.exists()


# -- the topology is the compose files' -----------------------------------------------------


def test_local_topology_mirrors_the_compose_files() -> None:
    """Counts, names, quorum, timings and instance environment match compose/ and consul/."""
    redis = _services("prod-redis.yml")
    assert sum(n.startswith("redis-replica-") for n in redis) == lc.REDIS_REPLICAS
    assert sum(n.startswith("sentinel-") for n in redis) == lc.SENTINELS
    sentinel_conf = CONFIG / "sentinel.conf"
    name, _, _, quorum = _conf_value(sentinel_conf, "sentinel", "monitor")
    assert (name, int(quorum)) == (lc.REDIS_MASTER_NAME, lc.SENTINEL_QUORUM)
    down_after = _conf_value(sentinel_conf, "sentinel", "down-after-milliseconds")
    failover = _conf_value(sentinel_conf, "sentinel", "failover-timeout")
    assert int(down_after[1]) == lc.SENTINEL_DOWN_AFTER * 1000
    assert int(failover[1]) == lc.SENTINEL_FAILOVER_TIMEOUT * 1000
    redis_conf = _conf_lines(CONFIG / "redis.conf")
    assert ["appendonly", "yes"] in redis_conf
    assert [line.split() for line in lc.REDIS_CONFIG] == [
        words for words in redis_conf if words[0].startswith("min-replicas-")
    ]
    (redis_loom,) = (_env(s) for n, s in redis.items() if n == "loom")
    assert redis_loom["REDIS_URL"].endswith(f"/{lc.REDIS_MASTER_NAME}?mode={lc.REDIS_MODE}")

    nats_services = _services("prod-nats.yml")
    assert sum(n.startswith("nats-") for n in nats_services) == lc.NATS_NODES
    nats_conf = (CONFIG / "nats-server.conf").read_text()
    assert re.search(rf"cluster\s*\{{\s*name:\s*{lc.NATS_CLUSTER_NAME}\s", nats_conf)
    consuls = [n for n in nats_services if n.startswith("consul-")]
    server = load_hcl((CONSUL / "server.hcl").read_text())
    assert lc.CONSUL_SERVERS == len(consuls) == server["bootstrap_expect"]
    (nats_loom,) = (_env(s) for n, s in nats_services.items() if n == "loom")
    assert "CONSUL_HTTP_ADDR" in nats_loom
    for env in (redis_loom, nats_loom):
        assert env["LOOM_NODE_ID"] == lc.NODE_ID
        assert env["LOOM_HA_OPTIONS"] == lc.HA_OPTIONS
    assert _env(_services("dev.yml")["loom"])["LOOM_TRANSPORT"] == "memory"


# -- real clusters --------------------------------------------------------------------------


async def _jetstream_replicates(servers: str) -> None:
    """A stream with 3 replicas is created on the cluster, takes a message and is removed."""
    client = await nats.connect(
        servers=servers.split(","), connect_timeout=5, max_reconnect_attempts=3
    )
    try:
        js = client.jetstream()
        info = await js.add_stream(name="LOCAL_CLUSTER", subjects=["local.cluster"], num_replicas=3)
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        ack = await js.publish("local.cluster", b"hello", timeout=5)
        assert ack.stream == "LOCAL_CLUSTER"
        await js.delete_stream("LOCAL_CLUSTER")
    finally:
        await client.close()


async def _requests(client_env: dict[str, str], count: int) -> int:
    """`count` app.run calls from a client using the cluster's env; how many were routed."""
    from loom.api.main import LoomApp

    from loom_ha.loom import loom_transport

    transport = loom_transport(env=client_env)
    try:
        app = LoomApp(transport=transport)
        answers = [await app.run(f"t{i}", target=f"node/{lc.NODE_ID}") for i in range(count)]
        assert answers == [f"t{i}" for i in range(count)]
        return int((transport.statistics().extra or {}).get("routed", 0))
    finally:
        await transport.close()


@pytest.mark.nats
@pytest.mark.consul
def test_up_nats_stack_then_down(cluster_dir: Path) -> None:
    """3 routed JetStream nodes, 3 Consul servers with a leader, 2 instances; down stops all."""
    state = _up(cluster_dir, "nats", 2)
    roles = [p.role for p in state.processes]
    assert roles.count("nats + jetstream") == lc.NATS_NODES
    assert roles.count("consul server") == lc.CONSUL_SERVERS
    assert roles.count("loom instance") == 2

    for node in (p for p in state.processes if p.role.startswith("nats")):
        routez = http_get_json(f"http://127.0.0.1:{node.ports['monitoring']}/routez")
        assert isinstance(routez, dict) and routez["num_routes"] >= lc.NATS_NODES - 1
    asyncio.run(_jetstream_replicates(state.client_env["LOOM_TRANSPORT"]))

    consul_http = [p.url for p in state.processes if p.role == "consul server"]
    leaders = {http_get_json(f"{url}/v1/status/leader") for url in consul_http}
    assert len(leaders) == 1 and str(leaders.pop()).startswith("127.0.0.1:")
    peers = http_get_json(f"{consul_http[0]}/v1/status/peers")
    assert isinstance(peers, list) and len(peers) == lc.CONSUL_SERVERS
    address = state.client_env["CONSUL_HTTP_ADDR"]
    assert state.client_env["LOOM_HA_REGISTRY"] == f"consul://{address}"
    assert all(p.env["CONSUL_HTTP_ADDR"] == address for p in state.processes if p.env)
    assert asyncio.run(_requests(state.client_env, 20)) == 20  # all through Consul

    _down_and_check(cluster_dir, state)


@pytest.mark.redis
def test_up_redis_stack_then_down(cluster_dir: Path) -> None:
    """Master + 2 replicas answer PING, 3 Sentinels name the master, 2 instances; down stops all."""
    state = _up(cluster_dir, "redis", 2)
    servers = [p for p in state.processes if p.role.startswith("redis ")]
    sentinels = [p for p in state.processes if p.role == "sentinel"]
    assert [p.role for p in servers] == ["redis master"] + ["redis replica"] * lc.REDIS_REPLICAS
    assert len(sentinels) == lc.SENTINELS
    master_port = servers[0].ports["port"]
    for server in servers:
        assert resp_command(("127.0.0.1", server.ports["port"]), "PING") == "PONG"
    info = resp_command(("127.0.0.1", master_port), "INFO", "replication")
    assert isinstance(info, bytes) and f"connected_slaves:{lc.REDIS_REPLICAS}" in info.decode()
    for sentinel in sentinels:
        reply = resp_command(
            ("127.0.0.1", sentinel.ports["port"]),
            "SENTINEL",
            "get-master-addr-by-name",
            lc.REDIS_MASTER_NAME,
        )
        assert reply == [b"127.0.0.1", str(master_port).encode()]
    transport = state.client_env["LOOM_TRANSPORT"]
    assert transport.startswith("redis+sentinel://") and transport.endswith("?mode=streams")
    for sentinel in sentinels:
        assert f"127.0.0.1:{sentinel.ports['port']}" in transport
    assert "LOOM_HA_REGISTRY" not in state.client_env  # as compose: Streams groups balance
    assert asyncio.run(_requests(state.client_env, 20)) == 0

    _down_and_check(cluster_dir, state)


# -- refusals and idempotence ---------------------------------------------------------------


def test_up_twice_fails_clearly_and_down_twice_is_fine(cluster_dir: Path) -> None:
    """A second `up` on a running dir refuses and names `down`; the first cluster is untouched."""
    state = _up(cluster_dir, "dev", 1)
    again = _cli("up", "--stack", "dev", "--instances", "1", "--dir", str(cluster_dir))
    assert again.returncode == 1
    assert "already running" in again.stdout and "loom-ha down" in again.stdout
    assert all(_running(p.pid) for p in state.processes)
    _down_and_check(cluster_dir, state)
    second = _cli("down", "--dir", str(cluster_dir))
    assert second.returncode == 0 and "Nothing running" in second.stdout


def test_down_with_nothing_running_exits_zero(tmp_path: Path) -> None:
    """`down` on a missing dir, or a dir that is not a state dir, says so and touches nothing."""
    result = _cli("down", "--dir", str(tmp_path / "missing"))
    assert result.returncode == 0 and "Nothing running" in result.stdout
    (tmp_path / "keep.txt").write_text("mine")
    result = _cli("down", "--dir", str(tmp_path))
    assert result.returncode == 0 and "Nothing running" in result.stdout
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_up_refuses_a_foreign_dir_and_a_missing_app(tmp_path: Path) -> None:
    """`up` never takes over a dir it did not create and names a missing app before starting."""
    (tmp_path / "keep.txt").write_text("mine")
    result = _cli("up", "--stack", "dev", "--dir", str(tmp_path))
    assert result.returncode == 1 and "not a loom-ha state dir" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    root = tmp_path / "cluster"
    result = _cli("up", "--stack", "dev", "--dir", str(root), "--app", str(tmp_path / "no.py"))
    assert result.returncode == 1 and "app not found" in result.stdout
    assert not root.exists()


def test_up_fails_with_the_log_of_an_instance_that_exits(cluster_dir: Path, tmp_path: Path) -> None:
    """An instance that dies before "is up" fails `up` with its log; nothing is left running."""
    app = tmp_path / "crash.py"
    app.write_text("import sys\nprint('no broker for me', file=sys.stderr)\nsys.exit(3)\n")
    result = _cli(
        "up", "--stack", "dev", "--instances", "2", "--dir", str(cluster_dir), "--app", str(app)
    )
    assert result.returncode == 1
    assert "exited with code 3" in result.stdout and "no broker for me" in result.stdout
    state = load_state(cluster_dir)
    assert state is not None and state.status == "failed" and state.live() == []
    result = _cli("down", "--dir", str(cluster_dir))
    assert result.returncode == 0 and not cluster_dir.exists()
