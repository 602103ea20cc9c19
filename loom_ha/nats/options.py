"""Options of the NATS backends: the connection (servers, credentials, failure detection),
the stream events are kept in, and how consumers deliver.

Their own module, so the connection and consumer code read them without importing a
transport. Server URLs are parsed here once: credentials in a URL are taken out of it, so
no URL loom-ha keeps, shows or logs carries a secret. nkey seeds and JWTs are only ever
named by their file's path.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict
from urllib.parse import unquote, urlsplit, urlunsplit

from loom_ha.errors import ConfigurationError
from loom_ha.nats._credentials import check_creds_file, check_seed_file, looks_secret
from loom_ha.policy import DeliveryPolicy

__all__ = [
    "DEFAULT_SERVERS",
    "URL_OPTIONS",
    "ConnectionOptions",
    "ConsumerOptions",
    "NatsOptions",
    "StreamOptions",
    "url_options",
]

DEFAULT_SERVERS: tuple[str, ...] = ("nats://127.0.0.1:4222",)
_SCHEMES = ("nats", "tls")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CREDENTIAL_FILES = ("nkeys_seed", "user_credentials")


class ConnectionOptions(TypedDict, total=False):
    """Keyword options every NATS transport accepts (see `NatsOptions`)."""

    user: str
    password: str
    token: str
    nkeys_seed: str | os.PathLike[str]
    user_credentials: str | os.PathLike[str]
    tls: ssl.SSLContext
    tls_ca_file: str
    tls_hostname: str
    name: str
    connect_timeout: float
    reconnect_wait: float
    max_reconnect_attempts: int | None
    ping_interval: float
    max_outstanding_pings: int
    reconnect_buffer: int


URL_OPTIONS: dict[str, Callable[[str], object]] = {
    "ping_interval": float,
    "max_outstanding_pings": int,
    "connect_timeout": float,
    "reconnect_wait": float,
    "nkeys_seed": str,
    "user_credentials": str,
    "tls_ca_file": str,
    "tls_hostname": str,
}
"""Connection options a transport URL may set (``nats://n1,n2?ping_interval=1``,
``tls://n1?user_credentials=/etc/nats/app.creds&tls_ca_file=/etc/nats/ca.pem``)."""


def url_options(pairs: Iterable[tuple[str, str]]) -> ConnectionOptions:
    """The connection options in a URL's query pairs, converted (ranges are checked by
    `NatsOptions.build`).

    Raises:
        ConfigurationError: an unknown option, or a value of the wrong type (named).
    """
    found: dict[str, object] = {}
    unknown = []
    for name, text in pairs:
        kind = URL_OPTIONS.get(name)
        if kind is None:
            unknown.append(name)
            continue
        try:
            found[name] = kind(text)
        except ValueError:
            raise ConfigurationError(
                f"option {name}={text!r} is not a valid {getattr(kind, '__name__', kind)}"
            ) from None
    if unknown:
        raise ConfigurationError(f"unknown NATS URL option(s): {', '.join(unknown)}")
    return found  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class NatsOptions:
    """Validated connection options.

    Attributes:
        servers: ``nats://`` or ``tls://`` URLs, without credentials (a URL's
            ``user:password@`` or ``token@`` is moved to `user`/`password` or `token`).
        user, password: user/password authentication; token: token authentication.
        nkeys_seed: path of a file holding an nkey user's seed (``SU...``): nkey auth.
        user_credentials: path of a ``.creds`` file (a user JWT and its seed, as ``nsc``
            writes them): decentralized JWT auth. One auth method at most; both files
            are read at every (re)connect, so a rotated file is picked up.
        tls: client `SSLContext`; tls_ca_file: a CA file to trust instead (builds one).
        tls_hostname: the name to verify the server certificate against.
        name: connection name shown by the server's monitoring.
        connect_timeout: bound of the first `connect()`, seconds.
        reconnect_wait: pause before retrying a server that just failed, seconds.
        max_reconnect_attempts: per server; None (default) never gives up.
        ping_interval, max_outstanding_pings: a PING every `ping_interval` seconds; the
            server is declared dead when `max_outstanding_pings` intervals in a row end
            with its PING unanswered and no other sign of life (a message from it, our
            backlog read by it), i.e. at most ``ping_interval * (max_outstanding_pings +
            1)`` seconds (2 s by default) after its last one, idle or under load.
        reconnect_buffer: bytes of publishes kept while reconnecting.
    """

    servers: tuple[str, ...] = DEFAULT_SERVERS
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkeys_seed: str | None = None
    user_credentials: str | None = None
    tls: ssl.SSLContext | None = None
    tls_ca_file: str | None = None
    tls_hostname: str | None = None
    name: str = "loom-ha"
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    max_reconnect_attempts: int | None = None
    ping_interval: float = 0.5
    max_outstanding_pings: int = 3
    reconnect_buffer: int = 8 * 1024 * 1024

    @classmethod
    def build(cls, servers: Sequence[str] | str, **options: object) -> NatsOptions:
        """Validate `servers` and `options`; move credentials out of the URLs.

        Raises:
            ConfigurationError: naming the bad URL (without its credentials), URL part or
                option.
        """
        urls = (servers,) if isinstance(servers, str) else tuple(servers)
        if not urls:
            raise ConfigurationError("servers: give at least one nats:// URL")
        unknown = set(options) - set(ConnectionOptions.__annotations__)
        if unknown:
            raise ConfigurationError(f"unknown NATS option(s): {', '.join(sorted(unknown))}")
        public: list[str] = []
        found: set[tuple[str | None, str | None, str | None]] = set()
        for url in urls:
            plain, credentials = _split_credentials(url)
            _check_url(plain)
            public.append(plain)
            if credentials is not None:
                found.add(credentials)
        if found:
            options.update(_merge_credentials(found, options))
        for name in _CREDENTIAL_FILES:
            if isinstance(options.get(name), os.PathLike):
                options[name] = os.fspath(options[name])  # type: ignore[call-overload]
        made = cls(servers=tuple(public), **options)  # type: ignore[arg-type]
        made._check()
        return made

    @property
    def detection_time(self) -> float:
        """The longest a server may stay silent before it is declared dead, seconds."""
        return self.ping_interval * (self.max_outstanding_pings + 1)

    def _check(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ConfigurationError("user and password: give both or neither")
        given = [
            name
            for name, value in (
                ("user/password", self.user),
                ("token", self.token),
                ("nkeys_seed", self.nkeys_seed),
                ("user_credentials", self.user_credentials),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ConfigurationError(
                f"credentials: give one of user/password, token, nkeys_seed, user_credentials "
                f"(got {' and '.join(given)})"
            )
        for name in _CREDENTIAL_FILES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or looks_secret(value)):
                raise ConfigurationError(f"{name}: give the path of a file, not its content")
            if value == "":
                raise ConfigurationError(f"{name}: an empty path")
        for name in ("connect_timeout", "reconnect_wait", "ping_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")
        attempts = self.max_reconnect_attempts
        if attempts is not None and (not isinstance(attempts, int) or attempts < 1):
            raise ConfigurationError(
                f"max_reconnect_attempts must be None (never give up) or >= 1, got {attempts!r}"
            )
        pings = self.max_outstanding_pings
        if not isinstance(pings, int) or pings < 1 or self.reconnect_buffer < 0:
            raise ConfigurationError(
                f"max_outstanding_pings must be an int >= 1 (got {pings!r}), reconnect_buffer >= 0"
            )
        if self.tls is not None and self.tls_ca_file is not None:
            raise ConfigurationError("tls and tls_ca_file: give one of them")

    @property
    def credentials_hint(self) -> str:
        """What to check when a server refuses who we are: names files, never a secret."""
        if self.nkeys_seed is not None:
            return f"the nkey seed in nkeys_seed={self.nkeys_seed!r}"
        if self.user_credentials is not None:
            return f"the JWT and seed in user_credentials={self.user_credentials!r}"
        if self.token is not None:
            return "the token"
        if self.user is not None:
            return f"user {self.user!r} and its password"
        return (
            "the credentials: none were given (user/password, token, nkeys_seed, user_credentials)"
        )

    def check_credential_files(self) -> None:
        """Read the nkey seed or ``.creds`` file and check its form, before nats-py reads
        it (see `loom_ha.nats._credentials`).

        Raises:
            ConfigurationError: the file is missing, unreadable or malformed (named).
        """
        if self.nkeys_seed is not None:
            check_seed_file(self.nkeys_seed)
        if self.user_credentials is not None:
            check_creds_file(self.user_credentials)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (from `tls`, `tls_ca_file`, or None)."""
        if self.tls is not None:
            return self.tls
        if self.tls_ca_file is not None:
            try:
                return ssl.create_default_context(cafile=self.tls_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"tls_ca_file {self.tls_ca_file!r}: {exc}") from exc
        return None


def _split_credentials(url: object) -> tuple[str, tuple[str | None, str | None, str | None] | None]:
    """`url` without its ``user:password@`` / ``token@`` part, and that part as
    (user, password, token), percent-decoded; None when the URL has none."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"servers: {url!r} is not a URL string")
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    plain = urlunsplit(parts._replace(netloc=host))
    user, colon, password = userinfo.partition(":")
    if colon:
        return plain, (unquote(user), unquote(password), None)
    return plain, (None, None, unquote(user))


def _merge_credentials(
    found: set[tuple[str | None, str | None, str | None]], options: dict[str, object]
) -> dict[str, object]:
    """The one set of credentials the URLs carry, checked against the options.

    nats-py would use a URL's credentials only for that URL, not for the servers the
    cluster announces; loom-ha uses them for every server (one account per cluster).
    """
    if len(found) > 1:
        raise ConfigurationError(
            "servers: the URLs carry different credentials; give one user/password or token"
        )
    user, password, token = found.pop()
    given = (options.get("user"), options.get("password"), options.get("token"))
    if given != (None, None, None) and given != (user, password, token):
        raise ConfigurationError(
            "credentials are given both in a server URL and as options, and they differ: "
            "give them once"
        )
    return {"user": user, "password": password, "token": token}


def _check_url(url: str) -> None:
    """Check one server URL (already without credentials: messages may show it)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"server URL {url!r}: bad port ({exc})") from exc
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"server URL {url!r}: scheme {parts.scheme!r} is not one of {', '.join(_SCHEMES)}"
        )
    if not parts.hostname:
        raise ConfigurationError(f"server URL {url!r}: no host")
    if port == 0:
        raise ConfigurationError(f"server URL {url!r}: port 0")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigurationError(f"server URL {url!r}: unexpected path, query or fragment")


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """The stream events are kept in, and the dead-letter stream.

    Attributes:
        name: stream name; it captures ``<subject_prefix>.>``.
        replicas: copies; None picks 3 when connected to a cluster of 3+ servers, else 1.
        max_age, max_msgs, max_bytes: retention limits (None: unlimited).
        duplicate_window: seconds during which a re-published event id is dropped.
        storage: ``file`` (survives restarts) or ``memory``.
        dead_letter_stream: name of the stream capturing ``<dead_letter_prefix>.>``.
        dead_letter_max_age: how long dead letters are kept (None: forever).
        manage: create/update both streams on connect (else they must exist).
    """

    name: str = "LOOM"
    replicas: int | None = None
    max_age: float | None = None
    max_msgs: int | None = None
    max_bytes: int | None = None
    duplicate_window: float = 120.0
    storage: Literal["file", "memory"] = "file"
    dead_letter_stream: str = "LOOM_DLQ"
    dead_letter_max_age: float | None = 14 * 24 * 3600.0
    manage: bool = True

    def __post_init__(self) -> None:
        for attr in ("name", "dead_letter_stream"):
            if not _NAME.fullmatch(getattr(self, attr)):
                raise ConfigurationError(
                    f"stream {attr} {getattr(self, attr)!r}: use [A-Za-z0-9_-]"
                )
        if self.name == self.dead_letter_stream:
            raise ConfigurationError("stream name and dead_letter_stream must differ")
        if self.replicas is not None and not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"stream replicas must be 1..5, got {self.replicas}")
        if self.duplicate_window <= 0:
            raise ConfigurationError("stream duplicate_window must be > 0 seconds")
        for attr in ("max_age", "max_msgs", "max_bytes", "dead_letter_max_age"):
            value = getattr(self, attr)
            if value is not None and value <= 0:
                raise ConfigurationError(f"stream {attr} must be > 0 or None, got {value}")


@dataclass(frozen=True, kw_only=True)
class ConsumerOptions:
    """How consumers deliver, redeliver and watch their pulls.

    Attributes:
        policy: attempts in total and the nak backoff between them.
        ack_wait: seconds before an unacked delivery goes to another member (handler
            crashed, process died): keep it above your slowest handler.
        batch: messages requested per pull.
        heartbeat: idle heartbeat of pulls; ~3 missed ones re-issue the pull.
        pull_expires: lifetime of one pull request, seconds.
        max_ack_pending: unacked deliveries per consumer before the server pauses it.
        start: ``new`` (default: no history replay) or ``all`` (replay the stream).
        fanout_inactive_threshold: a fan-out consumer left behind by a dead process is
            removed by the server after this many idle seconds.
        subscribe_timeout: bound of `subscribe()` (consumer creation), seconds.
    """

    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    ack_wait: float = 30.0
    batch: int = 256
    heartbeat: float = 2.0
    pull_expires: float = 30.0
    max_ack_pending: int = 2048
    start: Literal["new", "all"] = "new"
    fanout_inactive_threshold: float = 300.0
    subscribe_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.max_ack_pending < 1:
            raise ConfigurationError("batch and max_ack_pending must be >= 1")
        if self.heartbeat <= 0 or self.pull_expires < 2 * self.heartbeat:
            raise ConfigurationError("need heartbeat > 0 and pull_expires >= 2 * heartbeat")
        if self.ack_wait <= 0 or self.subscribe_timeout <= 0:
            raise ConfigurationError("ack_wait and subscribe_timeout must be > 0")
        if self.start not in ("new", "all"):
            raise ConfigurationError(f"start must be 'new' or 'all', got {self.start!r}")
