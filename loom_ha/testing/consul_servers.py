"""Real consul launchers: a `-dev` agent, a cluster of server agents and client agents, all
on 127.0.0.1, optionally with ACLs enforced (default deny).

Stdlib only; readiness comes from the HTTP API (`/v1/status/leader`), never from py-consul.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from ._net import free_ports, http_json
from ._process import (
    Launcher,
    ServerProcess,
    find_server_binary,
    not_ready,
    stop_all,
    wait_until,
)
from .netns import Placement

__all__ = ["ConsulAgent", "ConsulCluster"]

# No phone-home to checkpoint.hashicorp.com: nothing leaves the machine.
_COMMON_HCL = "disable_update_check = true"
# Test-speed Raft timing (production default is 5).
_FAST_RAFT_HCL = "performance { raft_multiplier = 1 }"


def _acl_hcl(management_token: str, *, server: bool) -> str:
    """ACLs on, default deny; the agent's own token is the management token.

    Consul 1.8 names the bootstrap token ``master`` (1.11+ also accept it, as a deprecated
    alias of ``initial_management``, which 1.8 rejects); only servers bootstrap it. The agent
    token lets the agent register its own node and sync services to the catalog.
    """
    token = json.dumps(management_token)
    tokens = f"master = {token}\n    agent = {token}" if server else f"agent = {token}"
    return (
        'primary_datacenter = "dc1"\n'
        'acl {\n  enabled = true\n  default_policy = "deny"\n  down_policy = "extend-cache"\n'
        f"  tokens {{\n    {tokens}\n  }}\n}}\n"
    )


class ConsulAgent(ServerProcess):
    """A consul agent on 127.0.0.1: `-dev` by default, a server of a `ConsulCluster`, or a
    client agent (neither `dev` nor `bootstrap_expect`: it joins `retry_join`).

    Every port (HTTP, Serf LAN/WAN, server RPC) is free-picked and fixed for the handle's
    life; DNS and gRPC are disabled so nothing binds a well-known port.

    Args:
        http_port: HTTP API port; a free one by default.
        dev: `-dev` mode (in-memory, self-elected leader). False needs `bootstrap_expect`
            (a server) or `retry_join` (a client agent).
        node_name: `-node`; bootstrap_expect: servers to wait for before electing.
        retry_join: Serf LAN addresses (`host:port`) of the other servers.
        ui: serve the web UI at `http_url` + `/ui/`.
        name: log/dir name; workdir: fixed dir (else an owned temp dir); data lives in it.
        placement: bind this address inside this network namespace (default 127.0.0.1, ours).
        log_level: `-log-level`; None keeps `-dev`'s DEBUG. A 1.8 agent's writes cost time
            per local service and check, far more at DEBUG: benchmarks use "info" (the
            production default).
        acl: enforce ACLs (default policy deny); `management_token` then holds the token
            that may do anything (a random UUID unless given: every member of a cluster and
            its client agents share one). `api()` sends it; `create_token()` makes others.
        hcl: more configuration, one HCL snippet per item (each a ``-hcl`` flag), e.g.
            ``["limits { http_max_conns_per_client = 400 }"]``.
    """

    def __init__(
        self,
        http_port: int | None = None,
        *,
        dev: bool = True,
        node_name: str = "loomha-consul",
        bootstrap_expect: int | None = None,
        retry_join: Sequence[str] = (),
        serf_lan_port: int | None = None,
        ui: bool = False,
        name: str = "consul",
        workdir: Path | None = None,
        placement: Placement | None = None,
        log_level: str | None = None,
        acl: bool = False,
        management_token: str | None = None,
        hcl: Sequence[str] = (),
    ) -> None:
        super().__init__(name=name, workdir=workdir, placement=placement)
        if not dev and bootstrap_expect is None and not retry_join:
            raise ValueError(
                "a non-dev agent needs bootstrap_expect (a server) or retry_join (a client)"
            )
        self.host = self.placement.host
        self.http_port, self.server_port = free_ports(2)
        self.serf_lan_port, self.serf_wan_port = free_ports(2, udp=True)
        if http_port is not None:
            self.http_port = http_port
        if serf_lan_port is not None:
            self.serf_lan_port = serf_lan_port
        self.dev = dev
        self.node_name = node_name
        self.bootstrap_expect = bootstrap_expect
        self.retry_join = tuple(retry_join)
        self.ui = ui
        self.log_level = log_level
        self.hcl = tuple(hcl)
        self.management_token: str | None = (management_token or str(uuid.uuid4())) if acl else None

    @property
    def acl(self) -> bool:
        """True when ACLs are enforced (default deny)."""
        return self.management_token is not None

    @property
    def client(self) -> bool:
        """True for a client agent (neither `-dev` nor a server)."""
        return not self.dev and self.bootstrap_expect is None

    @property
    def address(self) -> str:
        """`127.0.0.1:HTTP_PORT`, as py-consul and `CONSUL_HTTP_ADDR` expect it."""
        return f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        """`http://127.0.0.1:HTTP_PORT`."""
        return f"http://{self.address}"

    @property
    def serf_lan_address(self) -> str:
        """`127.0.0.1:SERF_LAN_PORT`, what other agents `-retry-join`."""
        return f"{self.host}:{self.serf_lan_port}"

    @property
    def server_address(self) -> str:
        """`127.0.0.1:SERVER_PORT`: the Raft/RPC address `/v1/status/leader` reports."""
        return f"{self.host}:{self.server_port}"

    def api(
        self, path: str, *, method: str = "GET", payload: object = None, token: str | None = None
    ) -> object:
        """Call `/v1/<path>` over plain HTTP (JSON in and out), e.g. to seed or inspect state.

        `token` (default: the management token when `acl`) goes in ``X-Consul-Token``.

        Raises:
            OSError: unreachable, or a non-2xx answer.
        """
        url = f"{self.http_url}/v1/{path.lstrip('/')}"
        secret = token if token is not None else self.management_token
        headers = {"X-Consul-Token": secret} if secret else None
        return http_json(url, method=method, payload=payload, timeout=2.0, headers=headers)

    def create_token(self, rules: str, *, name: str | None = None) -> str:
        """A new ACL token limited to `rules` (Consul's HCL policy language); its secret.

        Creates a policy named `name` (default: a random one) with the management token, then
        a token bound to it, e.g. ``create_token(acl_rules(register=["orders"]))`` with
        `loom_ha.discovery.consul.acl_rules`.

        Raises:
            ValueError: this agent does not enforce ACLs.
            OSError: Consul refused (an invalid rule is a 400 naming it).
        """
        if not self.acl:
            raise ValueError(f"{self.name} does not enforce ACLs: start it with acl=True")
        label = name or f"loomha-test-{uuid.uuid4().hex[:8]}"
        policy = self.api("acl/policy", method="PUT", payload={"Name": label, "Rules": rules})
        assert isinstance(policy, dict)
        token = self.api(
            "acl/token",
            method="PUT",
            payload={"Description": label, "Policies": [{"ID": policy["ID"]}]},
        )
        assert isinstance(token, dict)
        return str(token["SecretID"])

    def leader(self) -> str | None:
        """Server address of the Raft leader this agent knows, or None during an election."""
        leader = self.api("status/leader")
        return leader if isinstance(leader, str) and leader else None

    def _command(self) -> list[str]:
        argv = [str(find_server_binary("consul")), "agent"]
        if self.dev:
            argv.append("-dev")
        else:
            if self.bootstrap_expect is not None:
                argv += ["-server", "-bootstrap-expect", str(self.bootstrap_expect)]
            argv += ["-data-dir", str(self.workdir / "data"), "-hcl", _FAST_RAFT_HCL]
        argv += ["-node", self.node_name, "-bind", self.host, "-client", self.host]
        argv += ["-http-port", str(self.http_port), "-server-port", str(self.server_port)]
        argv += ["-serf-lan-port", str(self.serf_lan_port)]
        argv += ["-serf-wan-port", str(self.serf_wan_port)]
        argv += ["-dns-port", "-1", "-grpc-port", "-1", "-hcl", _COMMON_HCL]
        if self.ui:
            argv.append("-ui")
        if self.log_level is not None:
            argv += ["-log-level", self.log_level]
        for snippet in self.hcl:
            argv += ["-hcl", snippet]
        if self.management_token is not None:
            argv += ["-hcl", _acl_hcl(self.management_token, server=not self.client)]
        for peer in self.retry_join:
            argv += ["-retry-join", peer]
        if self.retry_join:
            argv += ["-retry-interval", "1s"]
        return argv

    def _probe(self) -> bool:
        # A dev agent is ready once it elected itself; a client agent once it reaches a
        # server that knows a leader; a cluster member once its API answers (the cluster's
        # own wait_ready() then waits for the election).
        if self.dev or self.client:
            if self.leader() is None:
                return False
            return self.acl_ready()
        self.api("agent/self")
        return True

    def acl_ready(self) -> bool:
        """True without ACLs; with them, once this agent serves the ACL API.

        Consul 1.4-1.10 servers start in "legacy mode" (``The ACL system is currently in
        legacy mode``, HTTP 500) until they see every server support the new ACLs, a few
        seconds after the election; the leader bootstraps the management token then.

        Raises:
            OSError: not yet.
        """
        if self.acl:
            self.api("acl/policies")
        return True


class ConsulCluster(Launcher):
    """`size` consul server agents on 127.0.0.1 that elect one leader (`-bootstrap-expect`).

    Members are `ConsulAgent`s named server0..N-1; each keeps its ports and data dir across
    `kill()`/`start()`, so a restarted server rejoins with its Raft state. Members live under
    `root` (kept by `stop()`), else under an owned temp dir that `stop()` removes; `ui` serves
    the web UI on every member. `placements` (one per server) put servers on the hosts of a
    `loom_ha.testing.netns.Network`. `acl` enforces ACLs on every member (one shared
    `management_token`); `client_agent()` makes a client agent that joins them.
    """

    ready_timeout: float = 45.0

    def __init__(
        self,
        size: int = 3,
        *,
        ui: bool = False,
        root: Path | None = None,
        placements: Sequence[Placement] = (),
        acl: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one server")
        if placements and len(placements) != size:
            raise ValueError(f"{len(placements)} placements for {size} servers")
        where = list(placements) or [Placement()] * size
        self._owns_root = root is None
        self._root = (
            root if root is not None else Path(tempfile.mkdtemp(prefix="loomha-consul-cluster-"))
        )
        self.management_token = str(uuid.uuid4()) if acl else None
        lan_ports = free_ports(size, udp=True)
        lan = [f"{where[i].host}:{port}" for i, port in enumerate(lan_ports)]
        self.members: list[ConsulAgent] = [
            ConsulAgent(
                dev=False,
                node_name=f"server{i}",
                bootstrap_expect=size,
                retry_join=[addr for j, addr in enumerate(lan) if j != i],
                serf_lan_port=lan_ports[i],
                ui=ui,
                name=f"server{i}",
                workdir=self._root / f"server{i}",
                placement=where[i],
                acl=acl,
                management_token=self.management_token,
            )
            for i in range(size)
        ]
        self._clients = 0

    @property
    def addresses(self) -> list[str]:
        """HTTP addresses (`127.0.0.1:PORT`) of every member."""
        return [member.address for member in self.members]

    def client_agent(self, *, placement: Placement | None = None) -> ConsulAgent:
        """A client agent (not started) that joins every server, with the cluster's ACLs.

        Start it with `start()` (or `ServerLauncher.start`); it is ready once it reaches a
        server that knows a leader. `stop()` of the cluster does not stop it: stop it first.
        """
        name = f"client{self._clients}"
        self._clients += 1
        return ConsulAgent(
            dev=False,
            node_name=name,
            retry_join=[member.serf_lan_address for member in self.members],
            name=name,
            placement=placement,
            acl=self.acl,
            management_token=self.management_token,
        )

    @property
    def acl(self) -> bool:
        """True when every member enforces ACLs (default deny)."""
        return self.management_token is not None

    def create_token(self, rules: str, *, name: str | None = None) -> str:
        """`ConsulAgent.create_token` through a live member."""
        return self._live()[0].create_token(rules, name=name)

    def leader(self) -> str:
        """Server (RPC) address of the current leader, as a live member reports it.

        Raises:
            LookupError: no live member knows a leader.
        """
        for member in self._live():
            try:
                leader = member.leader()
            except OSError:
                continue
            if leader is not None:
                return leader
        raise LookupError("no consul leader known")

    def leader_member(self) -> ConsulAgent:
        """The member handle that currently leads the cluster."""
        address = self.leader()
        for member in self.members:
            if member.server_address == address:
                return member
        raise LookupError(f"leader {address} is not a member of this cluster")

    def start(self) -> Self:
        """Launch every server at once and return once `wait_ready()` passes.

        Raises:
            FileNotFoundError: consul is not installed.
            ServerNotReadyError: a member or the cluster did not become ready (all are stopped).
        """
        try:
            for member in self.members:
                member.launch()
            for member in self.members:
                member.wait_ready()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, *, timeout: float | None = None) -> None:
        """Block until every live member names the same live leader and sees all servers as peers.

        Raises:
            ServerNotReadyError: not reached within `timeout` (default `ready_timeout`).
        """
        limit = self.ready_timeout if timeout is None else timeout
        try:
            wait_until(self._converged, timeout=limit, what="consul leader election")
        except TimeoutError as exc:
            raise not_ready("consul cluster", exc, self.members) from exc

    def stop(self) -> None:
        """Stop every member and remove their dirs (unless under a given `root`). Idempotent."""
        stop_all(self.members)
        if self._owns_root:
            shutil.rmtree(self._root, ignore_errors=True)

    def _live(self) -> list[ConsulAgent]:
        return [m for m in self.members if m.alive and not m.paused]

    def _converged(self) -> bool:
        live = self._live()
        live_servers = {m.server_address for m in live}
        leaders = {m.leader() for m in live}
        if len(leaders) != 1 or not leaders <= live_servers:
            return False
        for member in live:
            peers = member.api("status/peers")
            if not isinstance(peers, list) or len(peers) != len(self.members):
                return False
        return all(member.acl_ready() for member in live)
