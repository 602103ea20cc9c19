"""Real Redis Sentinel launchers: one sentinel process and a master + replicas + sentinels cluster.

Stdlib only; the Redis client library is never imported here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlencode

from ._net import RespError, RespValue, free_port, free_ports, resp_command
from ._process import (
    Launcher,
    ServerProcess,
    find_server_binary,
    not_ready,
    stop_all,
    wait_until,
)
from .netns import Placement
from .redis_servers import RedisServer, acl_user, quote_config, write_config_once

__all__ = ["RedisSentinel", "RedisSentinelCluster"]

# While members come up or fail over, these mean "not yet" rather than "broken".
_RETRY: tuple[type[Exception], ...] = (OSError, RespError, LookupError)


class RedisSentinel(ServerProcess):
    """One Sentinel process (`redis-server sentinel.conf --sentinel`) watching one master.

    `auth_user`/`auth_pass`: how it logs in to the master and replicas. `password`: what
    clients and the other sentinels must give it (``requirepass``); with `username` too,
    ``default`` is disabled, `username` is an ACL user, and sentinels log in to each other
    as it (``sentinel sentinel-user``/``sentinel-pass``). `extra_config`: more sentinel.conf
    lines (e.g. `acl_user()` lines for clients with fewer permissions).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        master_name: str,
        master: tuple[str, int],
        quorum: int = 2,
        down_after: float = 1.0,
        failover_timeout: float = 3.0,
        auth_pass: str | None = None,
        auth_user: str | None = None,
        username: str | None = None,
        password: str | None = None,
        extra_config: Sequence[str] = (),
        name: str = "sentinel",
        workdir: Path | None = None,
        placement: Placement | None = None,
    ) -> None:
        super().__init__(name=name, workdir=workdir, placement=placement)
        if username is not None and password is None:
            raise ValueError("a sentinel ACL username needs a password")
        for what, secret in (("auth_pass", auth_pass), ("password", password)):
            if secret is not None and any(c.isspace() for c in secret):
                # Sentinel's CONFIG REWRITE writes them unquoted (Redis 7.0): no restart.
                raise ValueError(f"sentinel {what} must not contain whitespace")
        self.host = self.placement.host
        self.port = port if port is not None else free_port()
        self.master_name = master_name
        self.master = master
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.auth_pass = auth_pass
        self.auth_user = auth_user
        self.username = username
        self.password = password
        self.extra_config = tuple(extra_config)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of this sentinel."""
        return (self.host, self.port)

    def command(self, *args: str, timeout: float = 2.0) -> RespValue:
        """Run one command against this sentinel (logged in if it needs it), on a new connection."""
        auth: tuple[str, ...] = ()
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
        return resp_command(self.address, *args, auth=auth, timeout=timeout)

    def master_address(self) -> tuple[str, int]:
        """The master this sentinel currently believes in (`get-master-addr-by-name`)."""
        reply = self.command("SENTINEL", "get-master-addr-by-name", self.master_name)
        if not isinstance(reply, list) or len(reply) != 2:
            raise RespError(f"no master known for {self.master_name!r}: {reply!r}")
        host, port = (v.decode() if isinstance(v, bytes) else str(v) for v in reply)
        return (host, int(port))

    def master_state(self) -> dict[str, str]:
        """`SENTINEL master <name>` as a dict (num-slaves, num-other-sentinels, flags, ...)."""
        reply = self.command("SENTINEL", "master", self.master_name)
        if not isinstance(reply, list):
            raise RespError(f"unexpected SENTINEL master reply {reply!r}")
        items = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
        return dict(zip(items[::2], items[1::2], strict=True))

    def _prepare(self) -> None:
        name = self.master_name
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            f"dir {quote_config(str(self.workdir))}",
            "daemonize no",
            'logfile ""',
            "sentinel resolve-hostnames no",
            f"sentinel monitor {name} {self.master[0]} {self.master[1]} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {round(self.down_after * 1000)}",
            f"sentinel failover-timeout {name} {round(self.failover_timeout * 1000)}",
        ]
        if self.auth_pass is not None:
            lines.append(f"sentinel auth-pass {name} {quote_config(self.auth_pass)}")
        if self.auth_user is not None:
            lines.append(f"sentinel auth-user {name} {quote_config(self.auth_user)}")
        if self.username is not None and self.password is not None:
            lines += [
                "user default off",
                acl_user(self.username, self.password),
                f"sentinel sentinel-user {quote_config(self.username)}",
                f"sentinel sentinel-pass {quote_config(self.password)}",
            ]
        elif self.password is not None:
            lines.append(f"requirepass {quote_config(self.password)}")
        lines += self.extra_config
        write_config_once(self.workdir / "sentinel.conf", lines)

    def _command(self) -> list[str]:
        binary = find_server_binary("redis-server")
        return [str(binary), str(self.workdir / "sentinel.conf"), "--sentinel"]

    def _probe(self) -> bool:
        return self.command("PING", timeout=1.0) == "PONG"


class RedisSentinelCluster(Launcher):
    """One master, `replicas` replicas and `sentinels` sentinels, all on 127.0.0.1.

    Failure detection is tuned for tests (`down_after`=1 s, `failover_timeout`=3 s). `servers[0]`
    is the initial master; after a failover use `master()` / `master_address()`.
    `username`/`password` protect every server (see `RedisServer`: replication and the
    sentinels log in with them); `sentinel_username`/`sentinel_password` protect every
    sentinel (see `RedisSentinel`, which takes `sentinel_extra_config` too); `url` carries
    all of them.
    `appendonly` and `extra_config` apply to every server (see `RedisServer`). Members live
    under `root` (kept by `stop()`), else under an owned temp dir that `stop()` removes.
    `placements` (one per process: servers, then sentinels) put members on the hosts of a
    `loom_ha.testing.netns.Network`.
    """

    ready_timeout: float = 30.0

    def __init__(
        self,
        *,
        master_name: str = "mymaster",
        replicas: int = 2,
        sentinels: int = 3,
        quorum: int = 2,
        down_after: float = 1.0,
        failover_timeout: float = 3.0,
        password: str | None = None,
        username: str | None = None,
        sentinel_password: str | None = None,
        sentinel_username: str | None = None,
        sentinel_extra_config: Sequence[str] = (),
        appendonly: bool = False,
        extra_config: Sequence[str] = (),
        root: Path | None = None,
        placements: Sequence[Placement] = (),
    ) -> None:
        count = 1 + replicas + sentinels
        if placements and len(placements) != count:
            raise ValueError(f"{len(placements)} placements for {count} processes")
        where = list(placements) or [Placement()] * count
        self.master_name = master_name
        self.password = password
        self.username = username
        self.sentinel_password = sentinel_password
        self.sentinel_username = sentinel_username
        self._owns_root = root is None
        self._root = (
            root if root is not None else Path(tempfile.mkdtemp(prefix="loomha-redis-sentinel-"))
        )
        ports = free_ports(count)
        master = (where[0].host, ports[0])
        self.servers: list[RedisServer] = [
            RedisServer(
                ports[i],
                password=password,
                username=username,
                replicaof=None if i == 0 else master,
                appendonly=appendonly,
                extra_config=extra_config,
                name=f"redis-{i}",
                workdir=self._root / f"redis-{i}",
                placement=where[i],
            )
            for i in range(1 + replicas)
        ]
        self.sentinels: list[RedisSentinel] = [
            RedisSentinel(
                port,
                master_name=master_name,
                master=master,
                quorum=quorum,
                down_after=down_after,
                failover_timeout=failover_timeout,
                auth_pass=password,
                auth_user=username,
                username=sentinel_username,
                password=sentinel_password,
                extra_config=sentinel_extra_config,
                name=f"sentinel-{i}",
                workdir=self._root / f"sentinel-{i}",
                placement=where[1 + replicas + i],
            )
            for i, port in enumerate(ports[1 + replicas :])
        ]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel."""
        return [s.address for s in self.sentinels]

    @property
    def url(self) -> str:
        """`redis+sentinel://[user:password@]host1:p1,host2:p2,.../<master_name>[?sentinel_...]`."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        creds = ""
        if self.password is not None:
            creds = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        options = {
            name: value
            for name, value in (
                ("sentinel_username", self.sentinel_username),
                ("sentinel_password", self.sentinel_password),
            )
            if value is not None
        }
        query = f"?{urlencode(options, quote_via=quote)}" if options else ""
        return f"redis+sentinel://{creds}{hosts}/{self.master_name}{query}"

    @property
    def members(self) -> list[ServerProcess]:
        """Every process handle: servers first, then sentinels."""
        return [*self.servers, *self.sentinels]

    def master_address(self) -> tuple[str, int]:
        """Ask the sentinels (first one that answers) for the current master address."""
        errors: list[str] = []
        for sentinel in self.sentinels:
            if not sentinel.alive or sentinel.paused:
                continue
            try:
                return sentinel.master_address()
            except (OSError, RespError) as exc:
                errors.append(f"{sentinel.name}: {exc}")
        raise ConnectionError(f"no sentinel answered: {errors}")

    def master(self) -> RedisServer:
        """The handle of the server the sentinels currently name as master."""
        return self.server_at(self.master_address())

    def server_at(self, address: tuple[str, int]) -> RedisServer:
        """The server handle listening on `address`."""
        for server in self.servers:
            if server.address == address:
                return server
        raise LookupError(f"no server of this cluster listens on {address}")

    def start(self) -> Self:
        """Start servers, then sentinels; return once `wait_ready()` passes.

        Raises:
            FileNotFoundError: redis-server is not installed.
            ServerNotReadyError: a member or the cluster did not become ready (all are stopped).
        """
        try:
            for member in self.servers:
                member.launch()
            for member in self.servers:
                member.wait_ready()
            self._wait_replication(self.servers[0], self.ready_timeout)
            for sentinel in self.sentinels:
                sentinel.launch()
            for sentinel in self.sentinels:
                sentinel.wait_ready()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, *, timeout: float | None = None) -> None:
        """Block until the sentinels agree on a live master that every live replica follows.

        Each live sentinel must also see all replicas and all other sentinels.

        Raises:
            ServerNotReadyError: not reached within `timeout` (default `ready_timeout`).
        """
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            wait_until(
                self._sentinels_agree, timeout=limit, what="sentinels to agree", ignore=_RETRY
            )
            master = self.master()
            self._wait_replication(master, max(0.1, deadline - time.monotonic()))
        except (TimeoutError, LookupError, ConnectionError) as exc:
            raise not_ready("redis sentinel cluster", exc, self.members) from exc

    def wait_for_failover(
        self, old_master: tuple[str, int], *, timeout: float = 30.0
    ) -> RedisServer:
        """Block until the sentinels promoted a master other than `old_master`; return it."""

        def promoted() -> bool:
            address = self.master_address()
            if address == old_master:
                return False
            return self.server_at(address).info().get("role") == "master"

        wait_until(
            promoted, timeout=timeout, what=f"failover away from {old_master}", ignore=_RETRY
        )
        self.wait_ready(timeout=timeout)
        return self.master()

    def stop(self) -> None:
        """Stop every member (sentinels first, so no failover runs meanwhile); remove owned dirs."""
        stop_all(self.sentinels)
        stop_all(self.servers)
        if self._owns_root:
            shutil.rmtree(self._root, ignore_errors=True)

    def _sentinels_agree(self) -> bool:
        live = [s for s in self.sentinels if s.alive and not s.paused]
        if not live:
            return False
        addresses = {s.master_address() for s in live}
        if len(addresses) != 1:
            return False
        master = self.server_at(addresses.pop())
        if not master.alive or master.info().get("role") != "master":
            return False
        for sentinel in live:
            state = sentinel.master_state()
            flags = state.get("flags", "").split(",")
            if "s_down" in flags or "o_down" in flags:
                return False
            if int(state.get("num-slaves", 0)) < len(self.servers) - 1:
                return False
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        return True

    def _wait_replication(self, master: RedisServer, timeout: float) -> None:
        def linked() -> bool:
            for server in self.servers:
                if server is master or not server.alive or server.paused:
                    continue
                info = server.info()
                if info.get("master_port") != str(master.port):
                    return False
                if info.get("master_link_status") != "up":
                    return False
            return True

        wait_until(
            linked, timeout=timeout, what=f"replicas to sync with {master.name}", ignore=_RETRY
        )
