"""A local cluster without Docker: the compose files' topologies as processes on this machine.

`start_cluster()` starts the brokers, Consul servers and N instances of the example app of a
stack with this package's launchers (free loopback ports, config and data under one state
dir, readiness waited for), leaves them running in their own sessions, and records them in
`<dir>/cluster.json`. `stop_cluster()`, usually from another process, stops what that file
records. `loom-ha up` / `loom-ha down` are the command line for both. Stdlib only.

Topologies (`tests/deploy/test_local_cluster.py` checks them against the compose files):

- ``dev`` (compose/dev.yml): no broker, instances on ``memory://``, each on its own.
- ``redis`` (compose/prod-redis.yml): master + 2 replicas (append-only file,
  ``min-replicas-to-write 1``) + 3 Sentinels (quorum 2), instances on Redis Streams through
  the Sentinels, registry in the Redis master.
- ``nats`` (compose/prod-nats.yml): 3 routed NATS servers with JetStream, 3 Consul servers
  (``bootstrap_expect = 3``, UI on), instances on JetStream, registered in Consul.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ._pids import ProcessId
from ._process import LAUNCH_MARKER, Launcher, ServerProcess, stop_all
from .cluster_state import (
    STATE_FILE,
    ClusterError,
    ClusterRunningError,
    ClusterState,
    ProcessRecord,
    StopReport,
    claim_state_dir,
    load_state,
    stop_cluster,
)
from .consul_servers import ConsulAgent, ConsulCluster
from .nats_servers import NatsCluster, NatsServer
from .redis_sentinel import RedisSentinel, RedisSentinelCluster
from .redis_servers import RedisServer

__all__ = [
    "STACKS",
    "STATE_FILE",
    "AppInstance",
    "ClusterError",
    "ClusterRunningError",
    "ClusterState",
    "ProcessRecord",
    "StopReport",
    "default_app",
    "load_state",
    "start_cluster",
    "stop_cluster",
]

STACKS = ("dev", "redis", "nats")
READY_TEXT = "is up"
"""An instance is ready once its log has a line containing this (compose/app/loom_app.py)."""

# Mirrors of compose/*.yml and compose/config/*: tests/deploy/test_local_cluster.py compares.
NODE_ID = "loom-echo"
HA_OPTIONS = "outbox=block&outbox_timeout=30"
REDIS_MODE = "streams"
REDIS_MASTER_NAME = "mymaster"
REDIS_REPLICAS = 2
REDIS_CONFIG = ("min-replicas-to-write 1", "min-replicas-max-lag 10")
SENTINELS = 3
SENTINEL_QUORUM = 2
SENTINEL_DOWN_AFTER = 5.0
SENTINEL_FAILOVER_TIMEOUT = 30.0
NATS_NODES = 3
NATS_CLUSTER_NAME = "loom"
CONSUL_SERVERS = 3

# Inherited settings that would override or confuse what the instances are given.
_CLEARED_ENV = (
    "LOOM_TRANSPORT",
    "REDIS_URL",
    "NATS_SERVERS",
    "LOOM_HA_OPTIONS",
    "LOOM_HA_REGISTRY",
    "LOOM_NODE_ID",
    "LOOM_HA_INSTANCE_ID",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_SSL",
)

# `down` stops stage 0 first: instances, then sentinels (no failover while Redis stops), then
# the brokers and Consul.
_STAGE_INSTANCE, _STAGE_SENTINEL, _STAGE_BROKER = 0, 1, 2


def default_app() -> Path:
    """compose/app/loom_app.py of the source checkout this package is imported from."""
    return Path(__file__).resolve().parents[2] / "compose" / "app" / "loom_app.py"


class AppInstance(ServerProcess):
    """One app process (`python APP`) with its own environment, ready once it logs "is up"."""

    def __init__(
        self,
        app: Path,
        env: Mapping[str, str],
        *,
        name: str,
        workdir: Path,
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(name=name, workdir=workdir)
        self.app = app
        self.env = dict(env)
        self.ready_timeout = ready_timeout

    def _command(self) -> list[str]:
        return [sys.executable, str(self.app)]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return env

    def _probe(self) -> bool:
        text = self.log_path.read_text(errors="replace")
        # Only what this launch wrote counts, not an earlier run's lines.
        _, _, current = text.rpartition(LAUNCH_MARKER)
        return READY_TEXT in current.partition("\n")[2]


def _describe(proc: ServerProcess) -> tuple[str, int, str, dict[str, int]]:
    """(role, stop stage, url, ports) of a launched process."""
    if isinstance(proc, AppInstance):
        return "loom instance", _STAGE_INSTANCE, "", {}
    if isinstance(proc, RedisSentinel):
        url = f"redis://{proc.host}:{proc.port}"
        return "sentinel", _STAGE_SENTINEL, url, {"port": proc.port}
    if isinstance(proc, RedisServer):
        role = "redis master" if proc.replicaof is None else "redis replica"
        return role, _STAGE_BROKER, proc.url, {"port": proc.port}
    if isinstance(proc, NatsServer):
        ports = {"client": proc.port, "monitoring": proc.monitoring_port}
        if proc.cluster_port is not None:
            ports["cluster"] = proc.cluster_port
        return "nats + jetstream", _STAGE_BROKER, proc.url, ports
    if isinstance(proc, ConsulAgent):
        ports = {
            "http": proc.http_port,
            "server": proc.server_port,
            "serf_lan": proc.serf_lan_port,
            "serf_wan": proc.serf_wan_port,
        }
        return "consul server", _STAGE_BROKER, proc.http_url, ports
    raise TypeError(f"unknown process kind {type(proc).__name__}")  # pragma: no cover


def _record(proc: ServerProcess, pid: int) -> ProcessRecord:
    role, stage, url, ports = _describe(proc)
    env = proc.env if isinstance(proc, AppInstance) else {}
    return ProcessRecord(
        name=proc.name,
        role=role,
        pid=pid,
        start_time=ProcessId.of(pid).start_time,
        stage=stage,
        url=url,
        log=str(proc.log_path),
        ports=ports,
        env=dict(env),
    )


class _Starter:
    """Starts one stack, recording every process in the state file as soon as it is launched."""

    def __init__(self, state: ClusterState, on_step: Callable[[str], None]) -> None:
        self.state = state
        self.root = Path(state.dir)
        self.on_step = on_step
        self.clusters: list[Launcher] = []
        self.handles: list[ServerProcess] = []
        self.apps: list[AppInstance] = []

    def record(self) -> None:
        """Save every launched process (pid known) into the state file."""
        records = []
        for proc in [*self.handles, *self.apps]:
            pid = proc.pid
            if pid is not None:
                records.append(_record(proc, pid))
        self.state.processes = records
        self.state.save()

    def step(self, what: str, action: Callable[[], object]) -> None:
        started = time.monotonic()
        self.on_step(f"{what} ...")
        action()
        self.record()
        self.on_step(f"{what}: ready in {time.monotonic() - started:.1f}s")

    def redis(self) -> None:
        cluster = RedisSentinelCluster(
            master_name=REDIS_MASTER_NAME,
            replicas=REDIS_REPLICAS,
            sentinels=SENTINELS,
            quorum=SENTINEL_QUORUM,
            down_after=SENTINEL_DOWN_AFTER,
            failover_timeout=SENTINEL_FAILOVER_TIMEOUT,
            appendonly=True,
            extra_config=REDIS_CONFIG,
            root=self.root / "redis",
        )
        self.clusters.append(cluster)
        self.handles += cluster.members
        for server in cluster.servers:
            server.launch()
        self.record()
        self.step(
            f"Redis master + {REDIS_REPLICAS} replicas + {SENTINELS} Sentinels", cluster.start
        )
        self.state.client_env = {
            # As compose/prod-redis.yml: no registry, the Streams groups balance requests.
            "LOOM_TRANSPORT": f"{cluster.url}?mode={REDIS_MODE}",
        }

    def nats(self) -> None:
        nats = NatsCluster(
            NATS_NODES, jetstream=True, cluster_name=NATS_CLUSTER_NAME, root=self.root / "nats"
        )
        consul = ConsulCluster(CONSUL_SERVERS, ui=True, root=self.root / "consul")
        self.clusters += [nats, consul]
        self.handles += [*nats.nodes, *consul.members]
        for member in self.handles:  # both clusters come up together
            member.launch()
        self.record()
        self.step(f"NATS cluster ({NATS_NODES} nodes, JetStream)", nats.start)
        self.step(f"Consul ({CONSUL_SERVERS} servers)", consul.start)
        first = consul.members[0]
        self.state.client_env = {
            "LOOM_TRANSPORT": ",".join(nats.servers),
            "LOOM_HA_REGISTRY": f"consul://{first.address}",
            "CONSUL_HTTP_ADDR": first.address,
        }
        self.state.links = {
            "Consul UI": f"{first.http_url}/ui/",
            "NATS monitoring": nats.nodes[0].monitoring_url,
        }

    def instances(self, app: Path, count: int, ready_timeout: float) -> None:
        stack = self.state.stack
        for n in range(1, count + 1):
            env = {**self.state.client_env, "LOOM_NODE_ID": NODE_ID}
            env["LOOM_HA_INSTANCE_ID"] = f"{stack}-{n}"
            if stack != "dev":
                env["LOOM_HA_OPTIONS"] = HA_OPTIONS
            name = f"loom-{n}"
            self.apps.append(
                AppInstance(
                    app,
                    env,
                    name=name,
                    workdir=self.root / "instances" / name,
                    ready_timeout=ready_timeout,
                )
            )
        for instance in self.apps:
            instance.launch()
        self.record()

        def wait() -> None:
            for instance in self.apps:
                instance.wait_ready()

        self.step(f"{count} instance(s) of {app.name}", wait)

    def stop(self) -> None:
        """Stop everything started so far (instances first), keeping the logs."""
        stop_all(self.apps)
        for cluster in reversed(self.clusters):
            cluster.stop()


def start_cluster(
    stack: str,
    root: Path,
    *,
    instances: int = 3,
    app: Path | None = None,
    ready_timeout: float = 30.0,
    on_step: Callable[[str], None] = lambda _: None,
) -> ClusterState:
    """Start `stack` under `root` and return its state once every process is ready.

    The processes run in their own sessions: they outlive the caller until `stop_cluster()`.

    Args:
        stack: one of `STACKS`.
        root: the state dir; created, or reused when it holds a stopped cluster's state.
        instances: app instances to start (0: brokers only).
        app: the app each instance runs (default: `default_app()`).
        ready_timeout: seconds each instance has to log "is up".
        on_step: called with a line of progress per step.

    Raises:
        ClusterRunningError: `root` records processes that still run.
        ClusterError: bad arguments, the app is missing, or `root` is not a state dir.
        FileNotFoundError: a server binary is not installed.
        ServerNotReadyError: something exited or timed out (everything is stopped first;
            the logs stay in `root`).
    """
    if stack not in STACKS:
        raise ClusterError(f"unknown stack {stack!r}: expected one of {', '.join(STACKS)}")
    if instances < 0:
        raise ClusterError("--instances must be 0 or more")
    app_path = (app if app is not None else default_app()).absolute()
    if instances and not app_path.is_file():
        raise ClusterError(
            f"app not found: {app_path}. `loom-ha up` runs compose/app/loom_app.py of a source "
            "checkout (pip install -e .); pass --app PATH to run another app"
        )
    root = root.absolute()
    claim_state_dir(root)
    state = ClusterState(stack=stack, dir=str(root))
    state.save()
    starter = _Starter(state, on_step)
    try:
        if stack == "redis":
            starter.redis()
        elif stack == "nats":
            starter.nats()
        else:
            state.client_env = {"LOOM_TRANSPORT": "memory://"}
        if instances:
            starter.instances(app_path, instances, ready_timeout)
    except BaseException:
        starter.stop()
        state.status = "failed"
        starter.record()
        raise
    state.status = "running"
    state.save()
    return state
