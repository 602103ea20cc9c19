"""Real nats-server launchers: one server (optionally JetStream, auth, TLS) and a routed cluster.

Auth: user/password, token, an nkey user, or operator mode (JWTs, a ``.creds`` file for the
client), the identities made in Python with ``nkeys`` (no ``nsc`` needed).

Stdlib only (plus ``nkeys`` for those two modes); readiness comes from the HTTP monitoring
port, never from nats-py.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self
from urllib.parse import quote

from ._nats_auth import (
    AUTH_CONFIG,
    CREDS_FILE,
    SEED_FILE,
    make_nkey_user,
    make_operator_auth,
    write_auth_config,
)
from ._net import free_ports, http_get, http_get_json
from ._process import (
    Launcher,
    ServerProcess,
    find_server_binary,
    not_ready,
    stop_all,
    wait_until,
)
from ._tls import make_test_certificates
from .netns import Placement

__all__ = ["NatsCluster", "NatsServer"]


class NatsServer(ServerProcess):
    """A nats-server on 127.0.0.1 with an HTTP monitoring port, in its own dir.

    Args:
        port: client port; a free one by default.
        jetstream: enable JetStream with its store under the working dir (kept by `restart()`).
        monitoring_port: HTTP monitoring port; a free one by default.
        user: require this user (with `password`); token: require this token instead.
        password: the password of `user`.
        auth: ``"nkey"`` admits one nkey user, whose seed is in `nkey_seed_file`; ``"jwt"``
            runs in operator mode (operator, system account and account JWTs preloaded in
            memory) and admits the user of `creds_file`. Identities are made on the first
            start and kept by `restart()`.
        tls: serve TLS with a fresh self-signed CA (see `ca_file`, `ssl_context()`).
        server_name: `-n`; cluster_port, routes, cluster_name: join a routed cluster.
        name: log/dir name; workdir: fixed dir (else an owned temp dir).
        placement: bind this address inside this network namespace (default 127.0.0.1, ours).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        jetstream: bool = False,
        monitoring_port: int | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        auth: Literal["nkey", "jwt"] | None = None,
        tls: bool = False,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        cluster_name: str | None = None,
        name: str = "nats",
        workdir: Path | None = None,
        placement: Placement | None = None,
    ) -> None:
        super().__init__(name=name, workdir=workdir, placement=placement)
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        if token is not None and user is not None:
            raise ValueError("use either user/password or token")
        if auth is not None and (user is not None or token is not None):
            raise ValueError(f"auth={auth!r} replaces user/password and token: give one")
        if auth not in (None, "nkey", "jwt"):
            raise ValueError(f"auth must be 'nkey', 'jwt' or None, got {auth!r}")
        self.host = self.placement.host
        self.port, self.monitoring_port = free_ports(2)
        if port is not None:
            self.port = port
        if monitoring_port is not None:
            self.monitoring_port = monitoring_port
        self.jetstream = jetstream
        self.user = user
        self.password = password
        self.token = token
        self.auth = auth
        self.tls = tls
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.cluster_name = cluster_name

    @property
    def url(self) -> str:
        """`nats://[user:password@|token@]127.0.0.1:PORT` (`tls://` with TLS)."""
        scheme = "tls" if self.tls else "nats"
        creds = ""
        if self.user is not None and self.password is not None:
            creds = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@"
        elif self.token is not None:
            creds = f"{quote(self.token, safe='')}@"
        return f"{scheme}://{creds}{self.host}:{self.port}"

    @property
    def nkey_seed_file(self) -> Path | None:
        """The nkey seed file of the user an ``auth="nkey"`` server admits (else None)."""
        return self.workdir / SEED_FILE if self.auth == "nkey" else None

    @property
    def creds_file(self) -> Path | None:
        """The ``.creds`` file (user JWT and seed) of an ``auth="jwt"`` server (else None)."""
        return self.workdir / CREDS_FILE if self.auth == "jwt" else None

    @property
    def monitoring_url(self) -> str:
        """Base URL of the HTTP monitoring endpoints (`/varz`, `/jsz`, `/healthz`, ...)."""
        return f"http://{self.host}:{self.monitoring_port}"

    @property
    def cluster_url(self) -> str | None:
        """`nats://127.0.0.1:CLUSTER_PORT` other nodes route to, or None outside a cluster."""
        if self.cluster_port is None:
            return None
        return f"nats://{self.host}:{self.cluster_port}"

    @property
    def store_dir(self) -> Path:
        """JetStream storage dir (inside the working dir, so it survives restarts)."""
        return self.workdir / "jetstream"

    def monitor(self, endpoint: str) -> dict[str, object]:
        """GET a monitoring endpoint such as `varz`, `routez` or `jsz` as a JSON object."""
        data = http_get_json(f"{self.monitoring_url}/{endpoint.lstrip('/')}")
        if not isinstance(data, dict):
            raise OSError(f"{endpoint}: expected a JSON object, got {data!r}")
        return data

    def route_peers(self) -> set[str]:
        """Server names this node currently has cluster routes to (from `/routez`)."""
        return _route_peer_names(self.monitor("routez"))

    def healthy(self) -> bool:
        """True when `/healthz` answers 200 (with JetStream: meta leader known and current)."""
        status, _ = http_get(f"{self.monitoring_url}/healthz", timeout=1.0)
        return status == 200

    def _prepare(self) -> None:
        if self.tls:
            make_test_certificates(self.workdir)
        if self.auth == "nkey":
            write_auth_config(self.workdir, make_nkey_user(self.workdir).server_config())
        elif self.auth == "jwt":
            write_auth_config(self.workdir, make_operator_auth(self.workdir).server_config())

    def _command(self) -> list[str]:
        argv = [str(find_server_binary("nats-server")), "-a", self.host, "-p", str(self.port)]
        if self.auth is not None:  # the config file first: the flags below take precedence
            argv += ["-c", str(self.workdir / AUTH_CONFIG)]
        argv += ["-m", str(self.monitoring_port)]
        if self.server_name is not None:
            argv += ["-n", self.server_name]
        if self.jetstream:
            argv += ["-js", "-sd", str(self.store_dir)]
        if self.user is not None and self.password is not None:
            argv += ["--user", self.user, "--pass", self.password]
        if self.token is not None:
            argv += ["--auth", self.token]
        files = self.tls_files
        if files is not None:
            argv += ["--tls", "--tlscert", str(files.cert_file), "--tlskey", str(files.key_file)]
        if self.cluster_url is not None:
            argv += ["--cluster", self.cluster_url]
            if self.cluster_name is not None:
                argv += ["--cluster_name", self.cluster_name]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        return argv

    def _probe(self) -> bool:
        # A clustered JetStream node is only fully healthy once a meta leader exists,
        # which needs its peers: the node itself is ready when JetStream is up.
        query = "?js-enabled-only=true" if self.jetstream and self.cluster_port else ""
        status, _ = http_get(f"{self.monitoring_url}/healthz{query}", timeout=1.0)
        if status != 200:
            return False
        with socket.create_connection((self.host, self.port), timeout=1.0):
            return True


class NatsCluster(Launcher):
    """`size` routed nats-server nodes on 127.0.0.1 (JetStream by default), named node0..N-1.

    A node restarted after `kill()`/`stop()` keeps its ports and JetStream store, so it rejoins.
    Nodes live under `root` (kept by `stop()`), else under an owned temp dir that `stop()` removes.
    `placements` (one per node) put nodes on the hosts of a `loom_ha.testing.netns.Network`.
    """

    ready_timeout: float = 30.0

    def __init__(
        self,
        size: int = 3,
        *,
        jetstream: bool = True,
        cluster_name: str = "loomha",
        root: Path | None = None,
        placements: Sequence[Placement] = (),
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        if placements and len(placements) != size:
            raise ValueError(f"{len(placements)} placements for {size} nodes")
        where = list(placements) or [Placement()] * size
        self.cluster_name = cluster_name
        self.jetstream = jetstream
        self._owns_root = root is None
        self._root = (
            root if root is not None else Path(tempfile.mkdtemp(prefix="loomha-nats-cluster-"))
        )
        ports = free_ports(3 * size)
        cluster_ports = ports[2 * size :]
        route_urls = [f"nats://{where[i].host}:{p}" for i, p in enumerate(cluster_ports)]
        self.nodes: list[NatsServer] = [
            NatsServer(
                ports[i],
                monitoring_port=ports[size + i],
                jetstream=jetstream,
                server_name=f"node{i}",
                cluster_port=cluster_ports[i],
                routes=[url for j, url in enumerate(route_urls) if j != i],
                cluster_name=cluster_name,
                name=f"node{i}",
                workdir=self._root / f"node{i}",
                placement=where[i],
            )
            for i in range(size)
        ]

    @property
    def servers(self) -> list[str]:
        """Client URLs of every node, for `nats.connect(servers=...)`."""
        return [node.url for node in self.nodes]

    def meta_leader(self) -> NatsServer:
        """The node currently leading the JetStream meta group.

        Raises:
            LookupError: no live node knows a leader (election in progress).
        """
        for node in self.nodes:
            if not node.alive or node.paused:
                continue
            try:
                leader = _meta_leader_name(node.monitor("jsz"))
            except OSError:
                continue
            for candidate in self.nodes:
                if candidate.server_name == leader and candidate.alive and not candidate.paused:
                    return candidate
        raise LookupError("no JetStream meta leader known")

    def node(self, server_name: str) -> NatsServer:
        """The node named `server_name` (``node0``...).

        Raises:
            LookupError: no such node.
        """
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise LookupError(f"no node named {server_name!r}")

    def stream_leader(self, stream: str) -> NatsServer:
        """The node currently leading `stream`'s raft group, as a live node reports it.

        Raises:
            LookupError: no live node knows a leader (election in progress, or no stream).
        """
        for node in self.nodes:
            if not node.alive or node.paused:
                continue
            try:
                leader = _stream_leader_name(node.monitor("jsz?streams=true"), stream)
            except OSError:
                continue
            if leader is not None:
                found = self.node(leader)
                if found.alive and not found.paused:
                    return found
        raise LookupError(f"no leader known for stream {stream!r}")

    def start(self) -> Self:
        """Launch every node at once and return once `wait_ready()` passes.

        Raises:
            FileNotFoundError: nats-server is not installed.
            ServerNotReadyError: a node or the cluster did not become ready (all are stopped).
        """
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, *, timeout: float | None = None) -> None:
        """Block until every live node routes to all other live nodes and, with JetStream,
        all of them agree on a meta leader and report healthy.

        Raises:
            ServerNotReadyError: not reached within `timeout` (default `ready_timeout`).
        """
        limit = self.ready_timeout if timeout is None else timeout
        try:
            wait_until(self._converged, timeout=limit, what="NATS routes and JetStream meta leader")
        except TimeoutError as exc:
            raise not_ready("NATS cluster", exc, self.nodes) from exc

    def stop(self) -> None:
        """Stop every node and remove their dirs (unless under a given `root`). Idempotent."""
        stop_all(self.nodes)
        if self._owns_root:
            shutil.rmtree(self._root, ignore_errors=True)

    def _converged(self) -> bool:
        live = [n for n in self.nodes if n.alive and not n.paused]
        names = {n.server_name for n in live}
        leaders: set[str | None] = set()
        for node in live:
            peers = node.route_peers()
            if not (names - {node.server_name}) <= peers:
                return False
            if self.jetstream:
                leaders.add(_meta_leader_name(node.monitor("jsz")))
        if self.jetstream:
            # Survivors keep naming a killed leader until they elect a new one.
            if len(leaders) != 1 or not leaders <= names:
                return False
            return all(node.healthy() for node in live)
        return True


def _route_peer_names(routez: dict[str, object]) -> set[str]:
    routes = routez.get("routes")
    if not isinstance(routes, list):
        return set()
    return {str(r["remote_name"]) for r in routes if isinstance(r, dict) and "remote_name" in r}


def _meta_leader_name(jsz: dict[str, object]) -> str | None:
    meta = jsz.get("meta_cluster")
    if not isinstance(meta, dict):
        return None
    leader = meta.get("leader")
    return leader if isinstance(leader, str) and leader else None


def _stream_leader_name(jsz: dict[str, object], stream: str) -> str | None:
    accounts = jsz.get("account_details")
    for account in accounts if isinstance(accounts, list) else ():
        details = account.get("stream_detail") if isinstance(account, dict) else None
        for detail in details if isinstance(details, list) else ():
            if isinstance(detail, dict) and detail.get("name") == stream:
                cluster = detail.get("cluster")
                leader = cluster.get("leader") if isinstance(cluster, dict) else None
                return leader if isinstance(leader, str) and leader else None
    return None
