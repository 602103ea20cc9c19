"""RedisConnector: finds the current master and keeps every connection of a transport on it.

It owns the command pool, the pool for blocking reads, and every dedicated connection
(Pub/Sub listeners, the liveness probe). The master is lost — and then *all* of them are
closed, so each reader reconnects to the new master (redis-py #3867, go-redis #583) — when:

* it stops answering without closing its sockets (a paused process, a frozen VM, dropped
  packets): a probe asks it every `probe_interval` (``ROLE`` with Sentinel, ``PING``
  otherwise), so it is declared lost at most `socket_timeout` after its last answer;
* a command gets no reply within `socket_timeout`, or its connection breaks;
* with Sentinel: ``+switch-master`` names another node, the sentinels' newest
  configuration names another node, or ``ROLE`` says it is a replica now.

Which node is master is `MasterFinder`'s to say (`_finder`), when it is gone `MasterWatch`'s
(`_watch`), and what the sentinels name `Sentinels`' (`_sentinel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection

from loom_ha._tasks import TaskSupervisor, finish_all, wait_event
from loom_ha.errors import ConnectionLostError, FailoverExhaustedError, TransportClosedError
from loom_ha.redis._connections import Abortable, Address, ConnectionFactory, LeanPool, connect
from loom_ha.redis._connections import checkpoint as checkpoint  # re-exported (bench)
from loom_ha.redis._errors import REDIS_ERRORS, map_redis_errors, translate
from loom_ha.redis._finder import MasterFinder
from loom_ha.redis._roundtrip import UnconfirmedError, Written, checkout, round_trip
from loom_ha.redis._sentinel import Sentinels
from loom_ha.redis._watch import MasterWatch
from loom_ha.redis.url import RedisSettings
from loom_ha.retry import RetryPolicy, forever, within

T = TypeVar("T")
log = logging.getLogger("loom_ha.redis")

# Reconnecting while the master is away: quick first tries, capped waits, forever.
RECONNECT_POLICY = forever()


def _timed_out(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was raised from) is a read or write that got no answer."""
    return isinstance(exc, rex.TimeoutError) or isinstance(
        getattr(exc, "__cause__", None), rex.TimeoutError
    )


class RedisConnector:
    """The live master of one transport and every connection to it.

    Args:
        settings: where and how to connect; `settings.socket_timeout` is also the longest
            a master may stay silent before it is declared lost (it is probed every
            `settings.liveness_interval`).
        owner: name used in logs and task names.
        longest_block: the longest ``BLOCK`` of a blocking read on `blocking_client()`:
            such a read fails when no reply came within it plus `socket_timeout`.
    """

    def __init__(self, settings: RedisSettings, *, owner: str, longest_block: float = 0.0) -> None:
        interval = settings.liveness_interval
        self.settings = settings
        self._owner = owner
        self._blocking_timeout = longest_block + settings.socket_timeout
        self._factory = ConnectionFactory(settings)
        self._sentinels = (
            Sentinels(settings, self._factory, owner=owner) if settings.sentinel else None
        )
        self._finder = MasterFinder(settings, self._factory, self._sentinels)
        self._watch = MasterWatch(
            self,
            self._sentinels,
            socket_timeout=settings.socket_timeout,
            probe_interval=interval,
            owner=owner,
        )
        self._tasks = TaskSupervisor(f"{owner}.connector")
        self._lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._address: Address | None = None
        self._suspect: Address | None = None  # the last master lost for its silence
        self._client: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._dedicated: set[Abortable] = set()
        self._closed = False
        self.generation = 0
        self.last_move: float | None = None  # time.monotonic() of the last re-establishment
        self._moved = asyncio.Event()  # set (and replaced) whenever a master is established
        self._health_listeners: list[Callable[[bool], None]] = []
        self.reconnect_policy = dataclasses.replace(RECONNECT_POLICY, sleep=self.nap)
        """`RECONNECT_POLICY` whose backoff ends as soon as a new master is established."""

    # -- public state ---------------------------------------------------------------------------

    @property
    def address(self) -> Address | None:
        """(host, port) of the current master, None while none is known."""
        return self._address

    @property
    def endpoint(self) -> str | None:
        """The current master (credential-free URL), None while none is known."""
        return self.settings.describe(self._address) if self._address else None

    @property
    def reconnects(self) -> int:
        """How often a new master connection was established after the first."""
        return max(0, self.generation - 1)

    @property
    def healthy(self) -> bool:
        """True while a verified master connection exists."""
        return self._client is not None

    def add_health_listener(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """Call `listener(healthy)` when the master is lost and when one is established again
        (what the transports announce as RECONNECTING and CONNECTED); returns its remover."""
        self._health_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._health_listeners.remove(listener)

        return remove

    def _announce(self, healthy: bool) -> None:
        for listener in list(self._health_listeners):
            try:
                listener(healthy)
            except Exception:
                log.exception("%s: health listener %r failed", self._owner, listener)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, timeout: float) -> None:
        """Find the master (retrying up to `timeout` s), then start probing and watching it.

        Raises:
            ConnectionLostError: no master was reachable within `timeout` (transient).
            TransportError: credentials refused or another non-transient error.
        """
        self._closed = False
        self._tasks.reopen()
        if self._sentinels is not None:
            self._sentinels.open()
        try:
            await within(timeout).call(self.client)
        except FailoverExhaustedError as exc:
            # The limit of this attempt, not a verdict on the broker: transient, like NATS's
            # connect timeout, so a caller that never gives up (HATransport) tries again.
            raise ConnectionLostError(
                f"{self._owner}: no redis master reachable within {timeout}s: {exc.__cause__}"
            ) from exc
        self._tasks.spawn(self._watch.probe_forever(), name="liveness-probe")
        if self._sentinels is not None:
            follow = self._sentinels.follow(self._watch.switched, self._watch.sentinels_asked)
            self._tasks.spawn(follow, name="sentinel-watch")

    async def close(self) -> None:
        """Stop the watchers and close every connection; finishes even when cancelled."""
        self._closed = True
        await finish_all(self._tasks.aclose, self._close_resources, owner=self._owner)

    async def _close_resources(self) -> None:
        await self._retire()
        if self._sentinels is not None:
            await self._sentinels.close()

    # -- clients ---------------------------------------------------------------------------------

    async def client(self) -> aioredis.Redis:
        """The command client of the current master (found first when none is known).

        Raises:
            ConnectionLostError: no master is reachable right now (retry later).
        """
        client = self._client
        if client is not None:
            return client
        async with self._lock:
            if self._client is None:
                await self._establish()
            assert self._client is not None
            return self._client

    async def blocking_client(self) -> aioredis.Redis:
        """A client whose reads may take `longest_block` + `socket_timeout` seconds."""
        await self.client()
        assert self._blocking is not None
        return self._blocking

    async def dedicated(self) -> tuple[AbstractConnection, int]:
        """A new connection to the master for a long-lived reader, and its generation.

        The connector closes it when the master moves; the reader then sees an
        error and asks for a new one. Give it back with `release()`. A reader
        whose connection broke just asks again: only when no new connection can
        be opened is the master reported lost (which closes every other
        connection, and would cut commands in flight on healthy ones).
        """
        await self.client()
        address, generation = self._address, self.generation
        assert address is not None
        conn = self._factory.connection(address)
        self._dedicated.add(conn)
        try:
            with map_redis_errors("redis connect"):
                await connect(conn)
        except ConnectionLostError as exc:
            await self.release(conn)
            # A reader's *broken* connection says little (we may have dropped it ourselves);
            # failing to open a new one says the master is gone: find it again.
            await self.lost(generation, exc, silent=_timed_out(exc))
            raise
        except BaseException:
            await self.release(conn)
            raise
        if generation != self.generation:  # moved while connecting
            await self.release(conn)
            raise ConnectionLostError("redis master moved while connecting")
        return conn, generation

    async def release(self, conn: AbstractConnection) -> None:
        """Close a dedicated connection (idempotent)."""
        self._dedicated.discard(conn)
        try:
            await conn.disconnect()
        except asyncio.CancelledError:
            await conn.disconnect(nowait=True)
            raise
        except Exception:  # already broken: nothing left to close
            log.debug("closing a broken connection failed", exc_info=True)

    async def nap(self, seconds: float) -> None:
        """Sleep `seconds`, or until a new master is established if that comes first.

        Readers back off with it: after a failover they reconnect as soon as anyone
        (the probe, the Sentinel watcher, a publisher) found the new master, not when
        a backoff grown during the election happens to end.
        """
        await wait_event(self._moved, seconds)

    async def lost(self, generation: int, reason: object = "", *, silent: bool = False) -> None:
        """Report that the master of `generation` failed; the next call finds it anew.

        `silent`: it stopped answering (rather than refusing or closing); while the
        sentinels name another node too, it is tried last.
        """
        async with self._lock:
            if generation != self.generation or self._client is None:
                return  # someone already moved on
            log.warning("%s: lost redis master %s: %s", self._owner, self.endpoint, reason)
            if silent:
                self._suspect = self._address
            await self._retire()

    async def run(
        self,
        operation: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        policy: RetryPolicy,
        what: str = "redis",
        blocking: bool = False,
    ) -> T:
        """Run `operation` on the master's client, following the master while retrying.

        The first attempt skips the retry machinery (the common case costs nothing).

        Raises:
            FailoverExhaustedError: `policy` ran out while the master was away.
            TransportError / ConfigurationError: a non-transient failure, at once.
        """

        async def attempt() -> T:
            client = self._blocking if blocking else self._client
            if client is None:
                client = await (self.blocking_client() if blocking else self.client())
            generation = self.generation
            try:
                if blocking:
                    result = await operation(client)
                else:
                    async with self._slots:  # pool_size bounds concurrent commands
                        result = await operation(client)
            except REDIS_ERRORS as exc:  # inline rather than map_redis_errors: the hot path
                mapped = translate(exc, what)
                if isinstance(mapped, ConnectionLostError):  # the master failed, not the op
                    await self.lost(generation, mapped, silent=_timed_out(exc))
                raise (mapped or exc) from exc
            checkpoint()
            return result

        if (self._blocking if blocking else self._client) is not None:
            try:  # the common case skips the retry machinery
                return await attempt()
            except ConnectionLostError:
                pass  # the master was lost, or the operation's own "retry me" (too few replicas)
        return await policy.call(attempt)

    async def execute(
        self,
        commands: Sequence[Sequence[Any]],
        *,
        policy: RetryPolicy,
        what: str,
        resend: bool,
        check: Callable[[list[Any]], None] | None = None,
        on_resend: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Send `commands` in one round trip on one connection; their replies, in order.

        Unlike `run()`, a retry depends on *where* an attempt failed:

        * before anything was written (no master, no connection): always retried;
        * after the commands were written (no reply in time, a broken connection, an
          error reply after the first command, or `check` rejecting the replies with a
          `ConnectionLostError`): Redis may have executed them. With `resend` they are
          sent again (at-least-once: `on_resend` is told, to count possible
          duplicates); without, `UnconfirmedError` is raised at once (at-most-once:
          a command is never run twice).

        Raises:
            UnconfirmedError: written, unconfirmed, and `resend` is false.
            FailoverExhaustedError: `policy` ran out while the master was away.
            TransportError / ConfigurationError: Redis refused a command (error reply).
        """

        async def attempt() -> list[Any]:
            client = await self.client()
            generation = self.generation
            pool = client.connection_pool
            async with self._slots:  # pool_size bounds concurrent commands
                try:
                    with map_redis_errors(what):
                        conn = await checkout(pool)
                except ConnectionLostError as exc:  # nothing was written: safe to retry
                    await self.lost(generation, exc, silent=_timed_out(exc))
                    raise
                try:
                    replies = await round_trip(conn, commands, what, check)
                    checkpoint()
                    return replies
                except ConnectionLostError as exc:  # Redis refused the first command: none ran
                    await self.lost(generation, exc)
                    raise
                except Written as written:
                    if isinstance(written.cause, REDIS_ERRORS):  # not `check`'s verdict
                        silent = _timed_out(written.cause)
                        await self.lost(generation, written.error, silent=silent)
                    if not resend:
                        raise UnconfirmedError(
                            f"{what}: sent, but not confirmed: {written.error}"
                        ) from written.error
                    if on_resend is not None:
                        on_resend()
                    raise written.error from written.cause
                finally:
                    await pool.release(conn)

        try:  # the first attempt skips the retry machinery (the common case costs nothing)
            return await attempt()
        except ConnectionLostError:
            return await policy.call(attempt)

    # -- finding the master -----------------------------------------------------------------------

    async def _establish(self) -> None:
        """Find and verify the master, then make it current (caller holds the lock)."""
        if self._closed:  # not transient: a retry loop must end, not wait for a reconnect
            raise TransportClosedError(f"{self._owner}: disconnected")
        await self._retire()
        address, client = await self._finder.find(suspect=self._suspect)
        self._client = client
        self._blocking = self._factory.client(address, socket_timeout=self._blocking_timeout)
        self._address = address
        if address == self._suspect:
            self._suspect = None  # it answered again
        self.generation += 1
        self.last_move = time.monotonic()
        self._moved.set()
        self._moved = asyncio.Event()
        if self.generation > 1:
            log.warning("%s: now using redis master %s", self._owner, self.endpoint)
        self._announce(True)

    async def _retire(self) -> None:
        """Drop the current clients and every dedicated connection (readers reconnect).

        Aborted, not closed: nothing still buffered may reach a master given up on, and
        a graceful close towards a frozen one would hang while we hold the lock.
        """
        client, blocking = self._client, self._blocking
        self._client = self._blocking = None
        if client is not None and not self._closed:
            self._announce(False)
        dedicated, self._dedicated = list(self._dedicated), set()
        for conn in dedicated:
            try:
                await conn.abort()
            except Exception:
                log.debug("dropping a dedicated connection failed", exc_info=True)
        for old in (client, blocking):
            if old is not None:
                try:
                    pool = old.connection_pool
                    if isinstance(pool, LeanPool):
                        await pool.abort()
                    await old.aclose(close_connection_pool=True)
                except Exception:
                    log.debug("dropping a retired client failed", exc_info=True)
