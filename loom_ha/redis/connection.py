"""RedisConnector: finds the current master and keeps every connection of a transport on it.

It owns the command pool, the pool for blocking reads, and every dedicated
connection (Pub/Sub listeners). With Sentinel it listens to ``+switch-master``
on the sentinels and checks ``ROLE`` periodically; when the master moves (or
turns out to be a replica) it closes *all* of them, so each reader reconnects
to the new master (redis-py #3867, go-redis #583). A candidate master is only
used once ``ROLE`` says ``master`` (redis-py #903: sentinels may still name the
dead node during an election).
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
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loom_ha._tasks import TaskSupervisor, finish_all
from loom_ha.errors import ConnectionLostError, FailoverExhaustedError, LoomHAError
from loom_ha.redis._connections import LeanConnection, LeanSSLConnection
from loom_ha.redis._errors import REDIS_ERRORS, map_redis_errors, translate
from loom_ha.redis._roundtrip import UnconfirmedError, Written, checkout, round_trip
from loom_ha.redis.url import RedisSettings
from loom_ha.retry import RetryPolicy, forever, within

T = TypeVar("T")
log = logging.getLogger("loom_ha.redis")

Address = tuple[str, int]

# Reconnecting while the master is away: quick first tries, capped waits, forever.
RECONNECT_POLICY = forever()
# Following a +switch-master: the named master should answer at once.
MOVE_POLICY = within(10.0)


def checkpoint() -> None:
    """Re-raise a cancellation that was swallowed below us.

    redis-py 8.1 on Python 3.11 sometimes returns a reply to a task that was
    cancelled meanwhile (about 1 in 40 cancels of a blocked read, measured), so
    a loop that only awaited redis-py would never stop. Every loop calls this.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _execute(client: Any, *args: Any) -> Any:
    """`execute_command` (untyped in redis-py) for commands without a typed method."""
    return await client.execute_command(*args)


async def _connect(conn: Any) -> None:
    await conn.connect()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisConnector:
    """The live master of one transport and every connection to it.

    Args:
        settings: where and how to connect.
        owner: name used in logs and task names.
        block_margin: extra read timeout granted to blocking commands.
        role_check_interval: seconds between ``ROLE`` checks (Sentinel mode).
    """

    def __init__(
        self,
        settings: RedisSettings,
        *,
        owner: str,
        block_margin: float = 5.0,
        role_check_interval: float = 1.0,
    ) -> None:
        self.settings = settings
        self._owner = owner
        self._block_margin = block_margin
        self._role_check_interval = role_check_interval
        self._tasks = TaskSupervisor(f"{owner}.connector")
        self._lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._address: Address | None = None
        self._client: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._dedicated: set[AbstractConnection] = set()
        self._sentinels: list[aioredis.Redis] = []
        self._closed = False
        self.generation = 0
        self.last_move: float | None = None  # time.monotonic() of the last re-establishment
        self._moved = asyncio.Event()  # set (and replaced) whenever a master is established
        self.reconnect_policy = dataclasses.replace(RECONNECT_POLICY, sleep=self.nap)
        """`RECONNECT_POLICY` whose backoff ends as soon as a new master is established."""

    # -- public state ---------------------------------------------------------------------------

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

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, timeout: float) -> None:
        """Find the master (retrying up to `timeout` s) and start the Sentinel watchers.

        Raises:
            ConnectionLostError: no master was reachable within `timeout` (transient).
            TransportError: credentials refused or another non-transient error.
        """
        self._closed = False
        self._tasks.reopen()
        if self.settings.sentinel:
            self._sentinels = [
                aioredis.Redis(connection_pool=self._pool(address, sentinel=True))
                for address in self.settings.addresses
            ]
        policy = within(timeout)
        try:
            await policy.call(self.client)
        except FailoverExhaustedError as exc:
            # The limit of this attempt, not a verdict on the broker: transient, like NATS's
            # connect timeout, so a caller that never gives up (HATransport) tries again.
            raise ConnectionLostError(
                f"{self._owner}: no redis master reachable within {timeout}s: {exc.__cause__}"
            ) from exc
        if self.settings.sentinel:
            self._tasks.spawn(self._watch_sentinels(), name="sentinel-watch")
            self._tasks.spawn(self._check_role(), name="role-check")

    async def close(self) -> None:
        """Stop the watchers and close every connection; finishes even when cancelled."""
        self._closed = True
        await finish_all(self._tasks.aclose, self._close_resources, owner=self._owner)

    async def _close_resources(self) -> None:
        await self._retire()
        sentinels, self._sentinels = self._sentinels, []
        for client in sentinels:
            await client.aclose(close_connection_pool=True)

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
        """A client whose reads may block for up to `block_margin` seconds more than usual."""
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
        conn = self._connection(address, health_check_interval=0)
        self._dedicated.add(conn)
        try:
            with map_redis_errors("redis connect"):
                await _connect(conn)
        except ConnectionLostError as exc:
            await self.release(conn)
            # A reader's *broken* connection says little (we may have dropped it ourselves);
            # failing to open a new one says the master is gone: find it again.
            await self.lost(generation, exc)
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
        (the Sentinel watcher, the role check, a publisher) found the new master,
        not when a backoff grown during the election happens to end.
        """
        moved = self._moved
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await moved.wait()

    async def lost(self, generation: int, reason: object = "") -> None:
        """Report that the master of `generation` failed; the next call finds it anew."""
        async with self._lock:
            if generation != self.generation or self._client is None:
                return  # someone already moved on
            log.warning("%s: lost redis master %s: %s", self._owner, self.endpoint, reason)
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
        client = self._blocking if blocking else self._client
        generation = self.generation
        if client is not None:
            try:
                if blocking:
                    result = await operation(client)
                else:
                    async with self._slots:  # pool_size bounds concurrent commands
                        result = await operation(client)
            except REDIS_ERRORS as exc:  # inline rather than map_redis_errors: the hot path
                mapped = translate(exc, what)
                if not isinstance(mapped, ConnectionLostError):
                    raise (mapped or exc) from exc
                await self.lost(generation, mapped)
            except ConnectionLostError:
                pass  # the operation's own "retry me" (e.g. too few replicas): not a lost master
            else:
                checkpoint()
                return result

        async def attempt() -> T:
            client = await (self.blocking_client() if blocking else self.client())
            generation = self.generation
            try:
                with map_redis_errors(what):
                    if blocking:
                        result = await operation(client)
                    else:
                        async with self._slots:
                            result = await operation(client)
                checkpoint()
                return result
            except ConnectionLostError as exc:
                if isinstance(exc.__cause__, REDIS_ERRORS):  # the master failed, not the op
                    await self.lost(generation, exc)
                raise

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
                    await self.lost(generation, exc)
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
                        await self.lost(generation, written.error)
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
        if self._closed:
            raise ConnectionLostError("redis connector is closed")
        await self._retire()
        errors: list[str] = []
        for address in await self._candidates(errors):
            client = aioredis.Redis(connection_pool=self._pool(address))
            try:
                with map_redis_errors(f"redis {address[0]}:{address[1]}"):
                    if self.settings.sentinel:
                        role = await _execute(client, "ROLE")
                        if _text(role[0]) != "master":
                            errors.append(f"{address}: role is {_text(role[0])}")
                            await client.aclose(close_connection_pool=True)
                            continue
                    else:
                        await client.ping()
            except ConnectionLostError as exc:
                errors.append(str(exc))
                await client.aclose(close_connection_pool=True)
                continue
            except BaseException:
                await client.aclose(close_connection_pool=True)
                raise
            self._client = client
            self._blocking = aioredis.Redis(
                connection_pool=self._pool(
                    address, socket_timeout=self.settings.socket_timeout + self._block_margin
                )
            )
            self._address = address
            self.generation += 1
            self.last_move = time.monotonic()
            self._moved.set()
            self._moved = asyncio.Event()
            if self.generation > 1:
                log.warning("%s: now using redis master %s", self._owner, self.endpoint)
            return
        raise ConnectionLostError(f"no usable redis master: {'; '.join(errors) or 'none named'}")

    async def _candidates(self, errors: list[str]) -> list[Address]:
        if not self.settings.sentinel:
            return [self.settings.addresses[0]]
        found: list[Address] = []
        for sentinel, address in zip(self._sentinels, self.settings.addresses, strict=True):
            try:
                with map_redis_errors(f"sentinel {address[0]}:{address[1]}"):
                    reply = await _execute(
                        sentinel, "SENTINEL", "get-master-addr-by-name", self.settings.master_name
                    )
            except ConnectionLostError as exc:
                errors.append(str(exc))
                continue
            if reply:
                candidate = (_text(reply[0]), int(_text(reply[1])))
                if candidate not in found:
                    found.append(candidate)
        return found

    async def _retire(self) -> None:
        """Close the current clients and every dedicated connection (readers reconnect)."""
        client, blocking = self._client, self._blocking
        self._client = self._blocking = None
        dedicated, self._dedicated = list(self._dedicated), set()
        for conn in dedicated:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                log.debug("closing a dedicated connection failed", exc_info=True)
        for old in (client, blocking):
            if old is not None:
                try:
                    await old.aclose(close_connection_pool=True)
                except Exception:
                    log.debug("closing a retired client failed", exc_info=True)

    # -- Sentinel watchers -------------------------------------------------------------------

    async def _watch_sentinels(self) -> None:
        """Follow ``+switch-master`` on one sentinel at a time, moving on when one fails."""
        while True:
            for address in self.settings.addresses:
                checkpoint()
                try:
                    await self._follow(address)
                except (ConnectionLostError, OSError) as exc:
                    log.debug("%s: sentinel %s: %s", self._owner, address, exc)
            await asyncio.sleep(0.2)  # every sentinel failed: back off before the next round

    async def _follow(self, address: Address) -> None:
        conn = self._connection(address, sentinel=True, health_check_interval=0)
        try:
            with map_redis_errors(f"sentinel {address[0]}:{address[1]}"):
                await _connect(conn)
                await conn.send_command("SUBSCRIBE", "+switch-master")
                await conn.read_response()
                await self._check_role_quietly()  # a switch may have happened meanwhile
                ping_sent = False
                interval = max(0.5, self._role_check_interval)
                while True:
                    reply = await conn.read_response(timeout=interval)
                    checkpoint()
                    if reply is None:
                        if ping_sent:
                            raise ConnectionLostError("sentinel did not answer PING")
                        await conn.send_command("PING")
                        ping_sent = True
                        continue
                    ping_sent = False
                    if _text(reply[0]) == "message":
                        parts = _text(reply[2]).split()
                        if parts and parts[0] == self.settings.master_name:
                            new = (parts[3], int(parts[4]))
                            log.warning("%s: +switch-master to %s", self._owner, new)
                            await self._move_if_not(new)
        finally:
            await conn.disconnect(nowait=True)

    async def _move_if_not(self, address: Address) -> None:
        generation = self.generation
        if self._address != address:
            await self.lost(generation, f"+switch-master to {address[0]}:{address[1]}")
            try:
                await MOVE_POLICY.call(self.client)
            except LoomHAError as exc:  # the role check keeps trying
                log.warning("%s: new master not reachable yet: %s", self._owner, exc)

    async def _check_role(self) -> None:
        """Periodically make sure the current master still is one (and reconnect if lost)."""
        while True:
            await asyncio.sleep(self._role_check_interval)
            await self._check_role_quietly()
            checkpoint()

    async def _check_role_quietly(self) -> None:
        try:
            await self._check_role_once()
        except LoomHAError as exc:
            log.debug("%s: role check: %s", self._owner, exc)

    async def _check_role_once(self) -> None:
        client = await self.client()
        generation = self.generation
        try:
            with map_redis_errors("redis ROLE"):
                role = await _execute(client, "ROLE")
        except ConnectionLostError as exc:
            await self.lost(generation, exc)
            raise
        if _text(role[0]) != "master":
            await self.lost(generation, f"{self.endpoint} is now a {_text(role[0])}")
            await self.client()

    # -- plumbing ------------------------------------------------------------------------------

    def _connection_class(self) -> type[Connection]:
        return LeanSSLConnection if self.settings.tls else LeanConnection

    def _connection(
        self, address: Address, *, sentinel: bool = False, health_check_interval: float = 0
    ) -> Connection:
        kwargs = self.settings.connection_kwargs(sentinel=sentinel)
        return self._connection_class()(
            host=address[0],
            port=address[1],
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )

    def _pool(
        self,
        address: Address,
        *,
        sentinel: bool = False,
        size: int | None = None,
        socket_timeout: float | None = None,
    ) -> ConnectionPool:
        kwargs = self.settings.connection_kwargs(sentinel=sentinel)
        if socket_timeout is not None:
            kwargs["socket_timeout"] = socket_timeout
        common: dict[str, Any] = {
            "connection_class": self._connection_class(),
            "host": address[0],
            "port": address[1],
            # Errors surface at once: this connector, not redis-py, decides where to retry.
            "retry": Retry(NoBackoff(), 0),
            # No per-command health PING: socket_timeout already bounds every read.
            "health_check_interval": 0,
            **kwargs,
        }
        # Not a BlockingConnectionPool: `run()` bounds concurrency with a semaphore,
        # which costs far less per command than the blocking pool's condition + timeout.
        return ConnectionPool(max_connections=size, **common)
