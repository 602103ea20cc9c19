"""The one nats-py connection of a transport: state, failure detection, reconnect signals.

Both delivery modes share it. It never gives up reconnecting unless told
(`max_reconnect_attempts`), declares a server that stops answering dead within
`NatsOptions.detection_time` (`loom_ha.nats._liveness`), and reports every state change
to listeners.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from loom_ha._state import StateCell, StateListener
from loom_ha._tasks import TaskSupervisor, finish_all
from loom_ha.errors import ConfigurationError, ConnectionLostError, TransportClosedError
from loom_ha.nats._errors import map_nats_errors
from loom_ha.nats._liveness import (
    CHOOSER_SUPPORTED,
    Liveness,
    ServerChooser,
    answered,
    close_client,
)
from loom_ha.nats.options import DEFAULT_SERVERS, ConnectionOptions, NatsOptions
from loom_ha.transport import TransportState

__all__ = [
    "DEFAULT_SERVERS",
    "ConnectionOptions",
    "NatsConnection",
    "NatsOptions",
    "StateListener",
]

T = TypeVar("T")

log = logging.getLogger("loom_ha.nats")


class _ProbeDenied(Exception):
    """The server refused a barrier probe (subject permissions)."""


class NatsConnection:
    """One nats-py client: opened once, reconnects forever by default, reports its state.

    A server that stops answering is declared dead after `NatsOptions.detection_time`
    at most; the socket is then cut and the client reconnects, to another server first.
    """

    def __init__(self, options: NatsOptions, backend: str) -> None:
        self.options = options
        self.backend = backend
        self.cell = StateCell(f"loom_ha.{backend}")  # `.state` is read on every publish
        self.reconnects = 0
        self.generation = 0  # bumps on every reconnect: outstanding pulls must be re-issued
        self.last_error: str | None = None
        self.reconnect_attempts = 0  # failed attempts while reconnecting
        self.slow_consumer_drops = 0  # messages nats-py dropped: a subscription's queue was full
        self.dead_servers = 0  # times a server stopped answering and was cut off
        self._cutting = False  # cut off, disconnect not yet reported: EOF errors are ours
        self._client: Client | None = None
        self._tasks = TaskSupervisor(f"loom_ha.{backend}.liveness")
        self._chooser = ServerChooser(options.reconnect_wait)
        self._serving: Any = None  # nats-py's URL of the server connected to (no credentials)
        self._on_lost: set[Callable[[], None]] = set()  # `until_lost()` waiters
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

    async def open(self) -> None:
        """Connect to the first reachable server within `connect_timeout`.

        Raises:
            ConnectionLostError: no server reachable in time.
            ConfigurationError: credentials (or their file) or the server's TLS certificate
                were rejected: never retried.
        """
        o = self.options
        o.check_credential_files()  # before nats-py reads them (see loom_ha.nats._credentials)
        self._closing = False
        self.cell.set(TransportState.CONNECTING)
        client = Client()
        self._client = client
        attempts = o.max_reconnect_attempts
        extra: dict[str, Any] = {}
        if CHOOSER_SUPPORTED:
            extra["reconnect_to_server_handler"] = self._chooser
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
                        nkeys_seed=o.nkeys_seed,
                        user_credentials=o.user_credentials,
                        tls=o.ssl_context(),
                        tls_hostname=o.tls_hostname,
                        connect_timeout=min(2.0, o.connect_timeout),  # type: ignore[arg-type]
                        reconnect_time_wait=o.reconnect_wait,  # type: ignore[arg-type]
                        # nats-py gives up after 60 attempts by default (#735); -1 never does.
                        max_reconnect_attempts=-1 if attempts is None else attempts,
                        # nats-py's own ping loop stays at its default (120 s x 2) as a
                        # backstop; `Liveness` does the detection (see loom_ha.nats._liveness).
                        pending_size=o.reconnect_buffer,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        closed_cb=self._on_closed,
                        **extra,
                    )
            self._opening = False
            self._serving = client.connected_url
            self._probe_prefix = client.new_inbox()
            with map_nats_errors(what=f"{self.backend}: barrier subscription"):
                await client.subscribe(self._probe_prefix + ".*", cb=self._on_probe)
        except BaseException:
            self._opening = False
            await self.close()
            self.cell.set(TransportState.DISCONNECTED)
            raise
        self._tasks.reopen()
        liveness = Liveness(
            lambda: self._client,
            lambda: self.generation,
            self._declare_dead,
            interval=o.ping_interval,
            misses=o.max_outstanding_pings,
        )
        self._tasks.spawn(liveness.run(), name=f"loom_ha.{self.backend}.liveness")
        self.cell.set(TransportState.CONNECTED)

    async def until_lost(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, cut short as soon as the connection is lost.

        A reply due on a lost connection never comes: the caller retries at once instead
        of waiting out its timeout (a JetStream publish re-sent with its message id).

        Raises:
            TimeoutError: the connection was lost (declared dead or disconnected) first.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as scope:

            def expire() -> None:
                scope.reschedule(loop.time())

            self._on_lost.add(expire)
            try:
                return await awaitable
            finally:
                self._on_lost.discard(expire)

    def _lost(self) -> None:
        waiters, self._on_lost = self._on_lost, set()
        for expire in waiters:
            expire()

    def _declare_dead(self, client: Client) -> None:
        """`Liveness` found the server silent: wake the waiters; the socket is cut next."""
        if client is not self._client:
            return
        self.dead_servers += 1
        window = self.options.ping_interval * self.options.max_outstanding_pings
        self.last_error = (
            f"server {self.endpoint} gave no sign of life for {window:g}s "
            "(PING unanswered, nothing received from it, nothing of ours read)"
        )
        log.warning("%s: %s; reconnecting", self.backend, self.last_error)
        self._cutting = True
        self._lost()

    async def round_trip(self, timeout: float) -> None:
        """A PING/PONG with the server connected to.

        Raises:
            ConnectionLostError: no PONG within `timeout` (or not connected).
        """
        client = self.client
        with map_nats_errors(what=f"{self.backend}: ping"):
            if not await answered(client, timeout):
                raise ConnectionLostError(f"{self.backend}: no answer to a PING in {timeout:g}s")

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
                    await self.until_lost(echoed)
        except _ProbeDenied:
            await self._flush(client, timeout)
        finally:
            self._probes.pop(subject, None)

    async def _flush(self, client: Client, timeout: float) -> None:
        """The fallback barrier: let nats-py's flusher write first, then PING/PONG."""
        await asyncio.sleep(0)  # the flusher was woken before us: it writes the SUB first
        await self.round_trip(timeout)

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
            await finish_all(self._tasks.aclose, owner=self.backend)
            return
        # A frozen server gets `ping_interval * max_outstanding_pings` to answer, as always.
        window = self.options.ping_interval * self.options.max_outstanding_pings
        await finish_all(
            self._tasks.aclose, lambda: close_client(client, window), owner=self.backend
        )

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
        if self._cutting:
            return  # the end of stream and reset we caused by cutting a silent server off
        self.last_error = f"{type(exc).__name__}: {exc}"
        text = str(exc).lower()  # nats-py lower-cases the server's -ERR text, subject included
        # nats-py retries a refused CONNECT or TLS handshake forever (max_reconnect_attempts
        # =-1) and only tells this callback; raising here ends its connect loop: one clear
        # error, no retry, since the same credentials or certificate will be refused again.
        if self._opening and _refused_credentials(exc, text):
            raise ConfigurationError(
                f"{self.backend}: the server refused the credentials ({exc}); "
                f"check {self.options.credentials_hint}"
            )
        if self._opening and isinstance(exc, ssl.SSLCertVerificationError):
            # Nothing is left to close: asyncio closed the socket, nats-py started no task
            # yet, and its close() would wait forever on the stream the failed handshake
            # took over (StreamWriter.wait_closed): forget the client instead.
            self._client = None
            raise ConfigurationError(
                f"{self.backend}: TLS certificate verification of the server failed "
                f"({exc.verify_message or exc}); check tls_ca_file / tls (the CA to trust) "
                "and tls_hostname"
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
        self._cutting = False
        self._chooser.lost(self._serving)
        self._lost()
        if not self._closing:
            log.warning("%s: connection lost, reconnecting", self.backend)
            self.cell.set(TransportState.RECONNECTING)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        self.generation += 1
        client = self._client
        self._serving = client.connected_url if client is not None else None
        log.warning("%s: reconnected to %s", self.backend, self.endpoint)
        self.cell.set(TransportState.CONNECTED)

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error("%s: gave up reconnecting (max_reconnect_attempts)", self.backend)
            self.cell.set(TransportState.CLOSED)


def _refused_credentials(exc: Exception, text: str) -> bool:
    """Whether nats-py's error means the server rejected who we are (not a network fault)."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    return "authorization violation" in text or "authentication" in text
