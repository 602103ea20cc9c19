"""redis-py connections, pools and clients of one transport, built from its `RedisSettings`.

redis-py bounds a write with ``asyncio.wait_for`` when a socket timeout is set; on
Python 3.11 that wraps every command in a new task and two extra trips through
the event loop (counted: 4.6 loop iterations per back-to-back PUBLISH against
2.0 without it). `LeanConnection` bounds the write with ``asyncio.timeout`` instead
(one timer, no task) and leaves everything else to redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loom_ha._handlers import raise_swallowed_cancellation
from loom_ha.redis.url import RedisSettings

Address = tuple[str, int]


# Every redis loop calls it: redis-py 8.1 on Python 3.11 sometimes returns a reply to a task
# cancelled meanwhile (about 1 in 40 cancels of a blocked read, measured), so a loop that only
# awaited redis-py would never stop.
checkpoint = raise_swallowed_cancellation


async def execute(client: Any, *args: Any) -> Any:
    """`execute_command` (untyped in redis-py) for commands without a typed method."""
    return await client.execute_command(*args)


async def connect(conn: Any) -> None:
    """`conn.connect()` (untyped in redis-py)."""
    await conn.connect()


def text(value: Any) -> str:
    """A reply element as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class _TimerBoundWrites(AbstractConnection):
    server_id: int | None = None
    """Redis's ``CLIENT ID`` of this connection, once asked (`reader_id`); reset on disconnect."""

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self.server_id = None  # a reconnect is a new server-side client
        await super().disconnect(*args, **kwargs)

    async def abort(self) -> None:
        """Drop the connection now: its server was given up.

        A graceful close first flushes what asyncio still buffers, which a frozen server
        never reads (the close hangs for `socket_connect_timeout`); aborting drops it. What
        the kernel already took may still reach the server if it resumes.
        """
        writer = self._writer
        if writer is not None:
            writer.transport.abort()
        await self.disconnect(nowait=True)

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        if not timeout or not self.is_connected:
            # Connecting (and its handshake reads) keeps redis-py's own timeouts.
            await super().send_packed_command(command, check_health)
            return
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        self.socket_timeout = None  # redis-py then writes without wait_for
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health=False)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise rex.TimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


class LeanConnection(_TimerBoundWrites, Connection):
    """A TCP `Connection` whose timed writes use a timer instead of a task."""


class LeanSSLConnection(_TimerBoundWrites, SSLConnection):
    """An `SSLConnection` whose timed writes use a timer instead of a task."""


Abortable = _TimerBoundWrites
"""What every connection `ConnectionFactory` makes is: a connection with `abort()`."""


async def reader_id(lease: aioredis.Redis) -> int:
    """The ``CLIENT ID`` of a single-connection client's connection (asked once per connection).

    A blocked read on it can then be woken with ``CLIENT UNBLOCK`` from another
    connection: it returns normally and its connection stays usable, where
    cancelling it would leave a reply in flight and cost the connection.
    """
    await lease.initialize()
    conn = lease.connection
    known = conn.server_id if isinstance(conn, Abortable) else None
    if known is not None:
        return known
    found = int(await lease.client_id())
    if isinstance(conn, Abortable):
        conn.server_id = found
    return found


class LeanPool(ConnectionPool):
    """A `ConnectionPool` of lean connections that can drop them all at once."""

    async def abort(self) -> None:
        """`Abortable.abort()` every connection, idle or in use (readers see it closed)."""
        for conn in [*self._available_connections, *self._in_use_connections]:
            if isinstance(conn, Abortable):
                await conn.abort()


class ConnectionFactory:
    """Connections, pools and clients to a server or a sentinel, all with the same settings.

    Every read is bounded by `settings.socket_timeout` unless a longer bound is asked for
    (blocking reads); errors surface at once, since the connector, not redis-py, decides
    where to retry.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self._class: type[LeanConnection | LeanSSLConnection] = (
            LeanSSLConnection if settings.tls else LeanConnection
        )

    def connection(self, address: Address, *, sentinel: bool = False) -> Abortable:
        """A new, unconnected connection (for a long-lived reader)."""
        return self._class(
            host=address[0],
            port=address[1],
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
            **self.settings.connection_kwargs(sentinel=sentinel),
        )

    def pool(
        self, address: Address, *, sentinel: bool = False, socket_timeout: float | None = None
    ) -> LeanPool:
        """A pool of command connections (unbounded: the connector bounds concurrency)."""
        kwargs: dict[str, Any] = self.settings.connection_kwargs(sentinel=sentinel)
        if socket_timeout is not None:
            kwargs["socket_timeout"] = socket_timeout
        # Not a BlockingConnectionPool: `RedisConnector.run()` bounds concurrency with a
        # semaphore, which costs far less per command than the blocking pool's condition.
        return LeanPool(
            connection_class=self._class,
            host=address[0],
            port=address[1],
            retry=Retry(NoBackoff(), 0),
            # No per-command health PING: socket_timeout already bounds every read.
            health_check_interval=0,
            **kwargs,
        )

    def client(
        self, address: Address, *, sentinel: bool = False, socket_timeout: float | None = None
    ) -> aioredis.Redis:
        """A client on a new pool; close it with ``aclose(close_connection_pool=True)``."""
        pool = self.pool(address, sentinel=sentinel, socket_timeout=socket_timeout)
        return aioredis.Redis(connection_pool=pool)
