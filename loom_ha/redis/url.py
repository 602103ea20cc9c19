"""Redis connection settings: parsing ``redis://``, ``rediss://`` and ``redis+sentinel://`` URLs.

Forms (``[...]`` is optional; user and password are percent-decoded)::

    redis://[[user]:password@]host[:port][/db][?option=value...]
    rediss://...                                   TLS, same syntax
    redis+sentinel://[[user]:password@]h1[:p1],h2[:p2]/master_name[/db][?...]
    rediss+sentinel://...                          TLS to sentinels and servers

Query options: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``
(none/optional/required), ``ssl_check_hostname`` (true/false), ``pool_size``,
``socket_timeout``, ``socket_connect_timeout``, ``probe_interval``, ``sentinel_username``,
``sentinel_password``. Anything wrong raises `ConfigurationError` naming the part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from loom_ha._redact import redact
from loom_ha.errors import ConfigurationError

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+sentinel": (False, True),
    "rediss+sentinel": (True, True),
}
_CERT_REQS = ("none", "optional", "required")
_TEXT_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "sentinel_username",
    "sentinel_password",
)


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    """Where and how to connect; built by `parse_redis_url` plus keyword overrides.

    Attributes:
        addresses: the server (direct mode) or every sentinel (Sentinel mode).
        master_name: the Sentinel master name; None means direct mode.
        db: database number.
        username, password: ACL credentials of the Redis servers.
        sentinel_username, sentinel_password: credentials of the sentinels.
        tls: connect with TLS; ``ssl_*`` configure it (redis-py's names).
        pool_size: most pooled command connections per transport.
        socket_timeout: the longest a server may stay silent, seconds: bound of every
            non-blocking command's reply, of a master's silence between two liveness
            probes, and (added to the ``BLOCK`` time) of a blocking read.
        socket_connect_timeout: bound of a TCP/TLS connect, seconds.
        probe_interval: seconds between liveness probes of the master; None means
            `socket_timeout` / 4 (see `liveness_interval`).
    """

    addresses: tuple[tuple[str, int], ...] = (("127.0.0.1", DEFAULT_PORT),)
    master_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = False
    pool_size: int = 64
    socket_timeout: float = 2.0
    socket_connect_timeout: float = 2.0
    probe_interval: float | None = None

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ConfigurationError("redis: at least one host is needed")
        for host, port in self.addresses:
            if not host:
                raise ConfigurationError("redis: empty host name")
            if not 0 < port < 65536:
                raise ConfigurationError(f"redis: port {port} of host {host!r} is out of range")
        if self.master_name is not None and not self.master_name:
            raise ConfigurationError("redis+sentinel: the master name is empty")
        if self.db < 0:
            raise ConfigurationError(f"redis: db must be >= 0, got {self.db}")
        if self.ssl_cert_reqs not in _CERT_REQS:
            raise ConfigurationError(
                f"redis: ssl_cert_reqs must be one of {_CERT_REQS}, got {self.ssl_cert_reqs!r}"
            )
        if self.pool_size < 1:
            raise ConfigurationError(f"redis: pool_size must be >= 1, got {self.pool_size}")
        for name in ("socket_timeout", "socket_connect_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"redis: {name} must be > 0, got {getattr(self, name)}")
        if self.probe_interval is not None and not 0 < self.probe_interval < self.socket_timeout:
            raise ConfigurationError(
                f"redis: probe_interval must be > 0 and below socket_timeout "
                f"({self.socket_timeout}), got {self.probe_interval}"
            )

    @property
    def liveness_interval(self) -> float:
        """Seconds between liveness probes: `probe_interval`, or a quarter of `socket_timeout`."""
        return self.probe_interval or self.socket_timeout / 4

    @property
    def sentinel(self) -> bool:
        """True when the master is found through Sentinel."""
        return self.master_name is not None

    def describe(self, address: tuple[str, int] | None = None) -> str:
        """A credential-free URL of `address` (default: the first one), for logs and statistics."""
        host, port = address or self.addresses[0]
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{host}:{port}/{self.db}"

    def connection_kwargs(self, *, sentinel: bool = False) -> dict[str, Any]:
        """Keyword arguments for a redis-py connection to a server (or to a sentinel)."""
        kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "username": self.sentinel_username if sentinel else self.username,
            "password": self.sentinel_password if sentinel else self.password,
            # RESP2: Pub/Sub messages come back as replies (RESP3 diverts them to push
            # handlers) and stream replies keep one shape.
            "protocol": 2,
        }
        if not sentinel:
            kwargs["db"] = self.db
        if self.tls:
            kwargs.update(
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        return kwargs


def _port(text: str, default: int, host: str) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        raise ConfigurationError(
            f"redis URL: port {text!r} of host {host!r} is not a number"
        ) from None


def _host_port(part: str, default: int) -> tuple[str, int]:
    if part.startswith("["):  # [ipv6]:port
        end = part.find("]")
        if end < 0:
            raise ConfigurationError(f"redis URL: unbalanced '[' in host {part!r}")
        host, rest = part[1:end], part[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"redis URL: junk after host {part!r}")
        return host, _port(rest[1:], default, host)
    host, _, port = part.partition(":")
    if not host:
        raise ConfigurationError(f"redis URL: empty host in {part!r}")
    return host, _port(port, default, host)


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"redis URL: {name} {text!r} is not a number") from None


def _float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigurationError(f"redis URL: {name} {text!r} is not a number") from None


def _bool(name: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"redis URL: {name} must be true or false, got {text!r}")


def _query(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        value = values[-1]
        if name in _TEXT_OPTIONS:
            out[name] = value
        elif name == "ssl_check_hostname":
            out[name] = _bool(name, value)
        elif name == "pool_size":
            out[name] = _int(name, value)
        elif name in ("socket_timeout", "socket_connect_timeout", "probe_interval"):
            out[name] = _float(name, value)
        elif name == "db":
            out[name] = _int(name, value)
        else:
            raise ConfigurationError(f"redis URL: unknown option {name!r}")
    return out


def parse_redis_url(url: str, **overrides: Any) -> RedisSettings:
    """Parse a Redis or Sentinel URL (see the module docstring); keywords override its parts.

    Raises:
        ConfigurationError: unknown scheme, bad host/port/db, missing master name,
            unknown query option, or a bad override; the message names the part.
    """
    shown = redact(url, url) if isinstance(url, str) else repr(url)  # never its credentials
    if isinstance(url, str) and "://" not in url and "@" in url:  # no scheme: no URL to redact
        shown = f"***@{url.rpartition('@')[2]}"
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"redis URL {shown!r} has no scheme (expected redis://...)")
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"redis URL: unknown scheme {scheme!r} (use one of {sorted(_SCHEMES)})"
        )
    tls, sentinel = _SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    rest, _, _fragment = rest.partition("#")
    netloc, _, path = rest.partition("/")
    values: dict[str, Any] = {"tls": tls}
    if "@" in netloc:
        creds, _, netloc = netloc.rpartition("@")
        user, has_password, password = creds.partition(":")
        if has_password:
            values["username"] = unquote(user) or None
            values["password"] = unquote(password)
        else:  # redis://secret@host means a password, as redis-cli reads it
            values["password"] = unquote(user)
    if not netloc:
        raise ConfigurationError(f"redis URL {shown!r}: no host")
    default_port = DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT
    hosts = tuple(_host_port(part, default_port) for part in netloc.split(","))
    segments = [unquote(s) for s in path.split("/")] if path else []
    if sentinel:
        if not segments or not segments[0]:
            raise ConfigurationError(
                f"redis+sentinel URL {shown!r}: the master name is missing (…/<master_name>)"
            )
        values["master_name"] = segments.pop(0)
    elif len(hosts) > 1:
        raise ConfigurationError(
            f"redis URL {shown!r}: several hosts need redis+sentinel:// (a Sentinel URL)"
        )
    if segments and segments[0]:
        values["db"] = _int("db", segments.pop(0))
    if any(segments):
        raise ConfigurationError(
            f"redis URL {shown!r}: unexpected path part {'/'.join(segments)!r}"
        )
    values["addresses"] = hosts
    values.update(_query(query))
    fields = {f.name for f in dataclasses.fields(RedisSettings)}
    for name, value in overrides.items():
        if name not in fields:
            raise ConfigurationError(f"redis: unknown option {name!r}")
        if value is not None:
            values[name] = value
    return RedisSettings(**values)


def settings_from(
    url: str | None,
    *,
    sentinels: Sequence[tuple[str, int]] | None = None,
    master_name: str | None = None,
    **overrides: Any,
) -> RedisSettings:
    """Settings from a URL, or from explicit Sentinel arguments (never both)."""
    if sentinels is not None or master_name is not None:
        if url is not None:
            raise ConfigurationError("redis: pass a URL or sentinels=/master_name=, not both")
        if not sentinels or not master_name:
            raise ConfigurationError("redis: Sentinel mode needs both sentinels= and master_name=")
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in sentinels)
        url = f"redis+sentinel://{hosts}/{master_name}"
    return parse_redis_url(url or "redis://127.0.0.1:6379/0", **overrides)
