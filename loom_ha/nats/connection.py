"""The one nats-py connection of a transport: validated options, state, reconnect signals.

Both delivery modes share it. It never gives up reconnecting unless told
(`max_reconnect_attempts`), and it reports every state change to listeners.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from loom_ha._state import StateCell, StateListener
from loom_ha._tasks import finish_all
from loom_ha.errors import ConfigurationError, TransportClosedError
from loom_ha.nats._errors import map_nats_errors
from loom_ha.transport import TransportState

__all__ = [
    "DEFAULT_SERVERS",
    "ConnectionOptions",
    "NatsConnection",
    "NatsOptions",
    "StateListener",
]

log = logging.getLogger("loom_ha.nats")


DEFAULT_SERVERS: tuple[str, ...] = ("nats://127.0.0.1:4222",)
_SCHEMES = ("nats", "tls")


class ConnectionOptions(TypedDict, total=False):
    """Keyword options every NATS transport accepts (see `NatsOptions`)."""

    user: str
    password: str
    token: str
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


@dataclass(frozen=True, kw_only=True)
class NatsOptions:
    """Validated connection options.

    Attributes:
        servers: ``nats://`` or ``tls://`` URLs (credentials in the URL are allowed).
        user, password: user/password authentication; token: token authentication.
        tls: client `SSLContext`; tls_ca_file: a CA file to trust instead (builds one).
        tls_hostname: the name to verify the server certificate against.
        name: connection name shown by the server's monitoring.
        connect_timeout: bound of the first `connect()`, seconds.
        reconnect_wait: pause before retrying a server that just failed, seconds.
        max_reconnect_attempts: per server; None (default) never gives up.
        ping_interval, max_outstanding_pings: detect a dead peer after about
            ``ping_interval * max_outstanding_pings`` seconds of silence.
        reconnect_buffer: bytes of publishes kept while reconnecting.
    """

    servers: tuple[str, ...] = DEFAULT_SERVERS
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls: ssl.SSLContext | None = None
    tls_ca_file: str | None = None
    tls_hostname: str | None = None
    name: str = "loom-ha"
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    max_reconnect_attempts: int | None = None
    ping_interval: float = 10.0
    max_outstanding_pings: int = 3
    reconnect_buffer: int = 8 * 1024 * 1024

    @classmethod
    def build(cls, servers: Sequence[str] | str, **options: object) -> NatsOptions:
        """Validate `servers` and `options`.

        Raises:
            ConfigurationError: naming the bad URL, URL part or option.
        """
        urls = (servers,) if isinstance(servers, str) else tuple(servers)
        if not urls:
            raise ConfigurationError("servers: give at least one nats:// URL")
        for url in urls:
            _check_url(url)
        unknown = set(options) - set(ConnectionOptions.__annotations__)
        if unknown:
            raise ConfigurationError(f"unknown NATS option(s): {', '.join(sorted(unknown))}")
        made = cls(servers=urls, **options)  # type: ignore[arg-type]
        made._check()
        return made

    def _check(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ConfigurationError("user and password: give both or neither")
        if self.token is not None and self.user is not None:
            raise ConfigurationError("token: use either user/password or a token, not both")
        for name in ("connect_timeout", "reconnect_wait", "ping_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")
        attempts = self.max_reconnect_attempts
        if attempts is not None and (not isinstance(attempts, int) or attempts < 1):
            raise ConfigurationError(
                f"max_reconnect_attempts must be None (never give up) or >= 1, got {attempts!r}"
            )
        if self.max_outstanding_pings < 1 or self.reconnect_buffer < 0:
            raise ConfigurationError("max_outstanding_pings must be >= 1, reconnect_buffer >= 0")
        if self.tls is not None and self.tls_ca_file is not None:
            raise ConfigurationError("tls and tls_ca_file: give one of them")

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


def _check_url(url: object) -> None:
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"servers: {url!r} is not a URL string")
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


class _ProbeDenied(Exception):
    """The server refused a barrier probe (subject permissions)."""


class NatsConnection:
    """One nats-py client: opened once, reconnects forever by default, reports its state."""

    def __init__(self, options: NatsOptions, backend: str) -> None:
        self.options = options
        self.backend = backend
        self.cell = StateCell(f"loom_ha.{backend}")  # `.state` is read on every publish
        self.reconnects = 0
        self.generation = 0  # bumps on every reconnect: outstanding pulls must be re-issued
        self.last_error: str | None = None
        self.reconnect_attempts = 0  # failed attempts while reconnecting
        self.slow_consumer_drops = 0  # messages nats-py dropped: a subscription's queue was full
        self._client: Client | None = None
        self._closing = False
        self._opening = False  # inside open()'s client.connect(): refused credentials are fatal
        # barrier(): probes this connection publishes to itself (see there).
        self._probe_prefix = ""
        self._probe_ids = itertools.count()
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._probe_denied = False  # the account may not publish to its inbox: flush instead

    @property
    def client(self) -> Client:
        """The nats-py client (only while open)."""
        if self._client is None:
            raise TransportClosedError(f"{self.backend}: no connection")
        return self._client

    @property
    def endpoint(self) -> str | None:
        """URL (without credentials) of the server currently connected to."""
        client = self._client
        url = client.connected_url if client is not None else None
        if url is None:
            return None
        return f"{url.scheme}://{url.hostname}:{url.port}"

    @property
    def state(self) -> TransportState:
        """The connection's current state."""
        return self.cell.state

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call `listener` on every state change; returns a function that removes it."""
        return self.cell.add_listener(listener)

    def _set_state(self, state: TransportState) -> None:
        self.cell.set(state)

    async def wait_connected(self) -> None:
        """Return once connected (again)."""
        await self.cell.wait_connected()

    async def open(self) -> None:
        """Connect to the first reachable server within `connect_timeout`.

        Raises:
            ConnectionLostError: no server reachable in time.
            ConfigurationError: credentials or TLS were rejected.
        """
        o = self.options
        self._closing = False
        self._set_state(TransportState.CONNECTING)
        client = Client()
        self._client = client
        attempts = o.max_reconnect_attempts
        self._opening = True
        try:
            with map_nats_errors(what=f"{self.backend}: connecting to {', '.join(o.servers)}"):
                async with asyncio.timeout(o.connect_timeout):
                    await client.connect(
                        list(o.servers),
                        name=o.name,
                        user=o.user,
                        password=o.password,
                        token=o.token,
                        tls=o.ssl_context(),
                        tls_hostname=o.tls_hostname,
                        connect_timeout=min(2.0, o.connect_timeout),  # type: ignore[arg-type]
                        reconnect_time_wait=o.reconnect_wait,  # type: ignore[arg-type]
                        # nats-py gives up after 60 attempts by default (#735); -1 never does.
                        max_reconnect_attempts=-1 if attempts is None else attempts,
                        ping_interval=o.ping_interval,  # type: ignore[arg-type]
                        max_outstanding_pings=o.max_outstanding_pings,
                        pending_size=o.reconnect_buffer,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        closed_cb=self._on_closed,
                    )
            self._opening = False
            self._probe_prefix = client.new_inbox()
            with map_nats_errors(what=f"{self.backend}: barrier subscription"):
                await client.subscribe(self._probe_prefix + ".*", cb=self._on_probe)
        except BaseException:
            self._opening = False
            await self.close()
            self._set_state(TransportState.DISCONNECTED)
            raise
        self._set_state(TransportState.CONNECTED)

    async def barrier(self, timeout: float) -> None:
        """Return once the server has processed every command sent on this connection so far.

        nats-py's ``flush()`` cannot promise this: it writes its PING straight to the
        socket, ahead of commands still waiting in the client's pending buffer (a SUB
        made just before), so its PONG can come back before the server saw the SUB.
        A probe message published to ourselves travels behind those commands instead,
        and its echo proves the server processed everything before it.

        Raises:
            ConnectionLostError: no echo within `timeout` (reconnecting, or gone).
        """
        client = self.client
        if self._probe_denied:
            await self._flush(client, timeout)
            return
        subject = f"{self._probe_prefix}.{next(self._probe_ids)}"
        echoed = asyncio.get_running_loop().create_future()
        self._probes[subject] = echoed
        try:
            with map_nats_errors(what=f"{self.backend}: barrier"):
                await client.publish(subject, b"")
                async with asyncio.timeout(timeout):
                    await echoed
        except _ProbeDenied:
            await self._flush(client, timeout)
        finally:
            self._probes.pop(subject, None)

    async def _flush(self, client: Client, timeout: float) -> None:
        """The fallback barrier: let nats-py's flusher write first, then PING/PONG."""
        await asyncio.sleep(0)  # the flusher was woken before us: it writes the SUB first
        with map_nats_errors(what=f"{self.backend}: flush"):
            await client.flush(timeout=timeout)  # type: ignore[arg-type]

    async def _on_probe(self, msg: Msg) -> None:
        echoed = self._probes.pop(msg.subject, None)
        if echoed is not None and not echoed.done():
            echoed.set_result(None)

    async def close(self) -> None:
        """Close the socket and every nats-py task; finishes even when cancelled."""
        client, self._client = self._client, None
        self._closing = True
        probes, self._probes = self._probes, {}
        for echoed in probes.values():
            if not echoed.done():
                echoed.set_exception(TransportClosedError(f"{self.backend}: closed"))
        if client is None:
            return
        await finish_all(client.close, owner=self.backend)

    def mark(self, state: TransportState) -> None:
        """Set the state from the owning transport (e.g. DISCONNECTED after close)."""
        self._set_state(state)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # A handler fell ~512k messages (or 128 MB) behind: nats-py drops, we count.
            self.slow_consumer_drops += 1
            if self.slow_consumer_drops % 10_000 == 1:
                log.warning(
                    "%s: slow consumer on %s, messages dropped (%d so far)",
                    self.backend,
                    exc.subject,
                    self.slow_consumer_drops,
                )
            return
        self.last_error = f"{type(exc).__name__}: {exc}"
        text = str(exc).lower()  # nats-py lower-cases the server's -ERR text, subject included
        if self._opening and _refused_credentials(exc, text):
            # nats-py retries a refused CONNECT forever (max_reconnect_attempts=-1) and only
            # tells this callback; raising here ends its connect loop: one clear error, no
            # retry, since the same credentials will be refused again.
            raise ConfigurationError(
                f"{self.backend}: the server refused the credentials ({exc}); "
                "check user/password or token"
            )
        probe = self._probe_prefix.lower()
        if probe and "permissions violation" in text and probe in text:
            if not self._probe_denied:
                log.warning(
                    "%s: may not use its inbox %s for subscribe barriers (%s); falling back to "
                    "PING/PONG, which can confirm a subscription early under load",
                    self.backend,
                    self._probe_prefix,
                    text,
                )
            self._probe_denied = True
            probes, self._probes = self._probes, {}
            for echoed in probes.values():
                if not echoed.done():
                    echoed.set_exception(_ProbeDenied())
        if self.state is TransportState.RECONNECTING:
            self.reconnect_attempts += 1
        log.debug("%s: %s", self.backend, self.last_error)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("%s: connection lost, reconnecting", self.backend)
            self._set_state(TransportState.RECONNECTING)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        self.generation += 1
        log.warning("%s: reconnected to %s", self.backend, self.endpoint)
        self._set_state(TransportState.CONNECTED)

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error("%s: gave up reconnecting (max_reconnect_attempts)", self.backend)
            self._set_state(TransportState.CLOSED)


def _refused_credentials(exc: Exception, text: str) -> bool:
    """Whether nats-py's error means the server rejected who we are (not a network fault)."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    return "authorization violation" in text or "authentication" in text
