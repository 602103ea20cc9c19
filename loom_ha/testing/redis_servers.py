"""Real redis-server launcher: one standalone server (optionally TLS, ACL user, AOF, replica).

Stdlib only; the Redis client library is never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from ._net import LOCALHOST, RespError, RespValue, free_port, resp_command
from ._process import ServerProcess, find_server_binary
from ._tls import make_test_certificates
from .netns import Placement

__all__ = ["RedisServer", "acl_user"]


def quote_config(value: str) -> str:
    """Quote a redis.conf argument so spaces and quotes in passwords survive."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def acl_user(name: str, password: str, rules: str = "~* &* +@all") -> str:
    """A redis.conf (or sentinel.conf) line creating ACL user `name` with `password` and `rules`.

    Pass it in `extra_config` for users besides the launcher's own `username`, e.g. an
    application user with fewer permissions (docs/redis.md lists what loom-ha needs).
    """
    return f"user {name} on {quote_config('>' + password)} {rules}"


def write_config_once(path: Path, lines: Sequence[str]) -> None:
    """Write a config file unless it exists: Sentinel's CONFIG REWRITE must survive restarts."""
    if not path.exists():
        path.write_text("\n".join(lines) + "\n")


class RedisServer(ServerProcess):
    """A redis-server on 127.0.0.1 in its own dir, without persistence unless `appendonly`.

    Args:
        port: TCP (or TLS) port; a free one by default.
        password: `requirepass`, or the password of `username`.
        username: create this ACL user with all permissions and disable `default`; the
            launcher, replication (``masteruser``) and sentinels use it.
        tls: serve TLS only, with a fresh self-signed CA (see `ca_file`, `ssl_context()`).
        appendonly: enable the AOF, so data survives `restart()` and `kill()`.
        replicaof: (host, port) of a master to replicate.
        masterauth: password for `replicaof` (defaults to `password`); set on every
            server, since Sentinel may turn a master into a replica.
        extra_config: more redis.conf lines.
        name: log/dir name; workdir: fixed dir (else an owned temp dir).
        placement: bind this address inside this network namespace (default 127.0.0.1, ours).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        username: str | None = None,
        tls: bool = False,
        appendonly: bool = False,
        replicaof: tuple[str, int] | None = None,
        masterauth: str | None = None,
        extra_config: Sequence[str] = (),
        name: str = "redis",
        workdir: Path | None = None,
        placement: Placement | None = None,
    ) -> None:
        super().__init__(name=name, workdir=workdir, placement=placement)
        if username is not None and password is None:
            raise ValueError("an ACL username needs a password")
        self.host = self.placement.host
        self.port = port if port is not None else free_port()
        self.password = password
        self.username = username
        self.tls = tls
        self.appendonly = appendonly
        self.replicaof = replicaof
        self.masterauth = masterauth if masterauth is not None else password
        self.extra_config = tuple(extra_config)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the server."""
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """`redis://[user:password@]HOST:PORT/0` (`rediss://` with TLS)."""
        scheme = "rediss" if self.tls else "redis"
        creds = ""
        if self.password is not None:
            creds = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return f"{scheme}://{creds}{self.host}:{self.port}/0"

    def command(self, *args: str, timeout: float = 2.0) -> RespValue:
        """Run one command with the configured auth/TLS over a fresh connection."""
        auth: tuple[str, ...] = ()
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
        return resp_command(
            self.address, *args, auth=auth, ssl_context=self.ssl_context(), timeout=timeout
        )

    def info(self, section: str = "replication") -> dict[str, str]:
        """`INFO section` parsed into a dict."""
        reply = self.command("INFO", section)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key: value for key, value in pairs}

    def _prepare(self) -> None:
        lines = [
            f"bind {self.host}",
            # Protected mode refuses non-loopback clients of a password-less server; off the
            # loopback it runs in a private test network namespace (`placement`).
            f"protected-mode {'yes' if self.host == LOCALHOST else 'no'}",
            f"dir {quote_config(str(self.workdir))}",
            "daemonize no",
            'logfile ""',
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            # Replicas sync at once instead of after the default 5 s wait for more of them.
            "repl-diskless-sync-delay 0",
        ]
        if self.tls:
            files = make_test_certificates(self.workdir)
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {quote_config(str(files.cert_file))}",
                f"tls-key-file {quote_config(str(files.key_file))}",
                f"tls-ca-cert-file {quote_config(str(files.ca_file))}",
                "tls-auth-clients no",
                "tls-replication yes",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.username is not None and self.password is not None:
            lines += [
                "user default off",
                acl_user(self.username, self.password),
                f"masteruser {quote_config(self.username)}",
            ]
        elif self.password is not None:
            lines.append(f"requirepass {quote_config(self.password)}")
        if self.replicaof is not None:
            lines.append(f"replicaof {self.replicaof[0]} {self.replicaof[1]}")
        if self.masterauth is not None:
            lines.append(f"masterauth {quote_config(self.masterauth)}")
        lines += self.extra_config
        write_config_once(self.workdir / "redis.conf", lines)

    def _command(self) -> list[str]:
        return [str(find_server_binary("redis-server")), str(self.workdir / "redis.conf")]

    def _probe(self) -> bool:
        try:
            return self.command("PING", timeout=1.0) == "PONG"
        except RespError:
            return False  # LOADING, or auth not configured yet
