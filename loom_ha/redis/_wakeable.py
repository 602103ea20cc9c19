"""WakeableReader: a reader task's own connection, and how to end the task without losing it.

Cancelling a blocked XREAD/XREADGROUP leaves its reply on the way, so redis-py drops
the connection and the next reader opens a new one: request/reply churn (subscribe
and unsubscribe per call) then costs two TCP connections per call and fills the
port range with TIME-WAIT sockets. Instead the reader's read is woken with
``CLIENT UNBLOCK`` from another connection: it returns as if timed out, and its
connection goes back to the blocking pool for the next reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from loom_ha.errors import LoomHAError
from loom_ha.redis._connections import reader_id
from loom_ha.redis.connection import RedisConnector
from loom_ha.retry import ONCE

T = TypeVar("T")

# Pause before looking again while the reader finishes a command or its read reaches Redis.
LOOK_AGAIN = 0.002


class WakeableReader:
    """The state one reader task shares with whoever stops it.

    The task reads through `read()`, awaits handlers and sleeps through `parked()`,
    checks `stopping` before each step and calls `release()` when it ends.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._lease: aioredis.Redis | None = None  # one connection of the blocking pool
        self._blocked: int | None = None  # its CLIENT ID while a read may be blocked on it
        self._parking = False  # in a handler or a sleep: cancelling costs no connection

    async def read(self, client: aioredis.Redis, read: Callable[[aioredis.Redis], Any]) -> Any:
        """`read` on this reader's connection of `client`'s pool; None once stopping."""
        lease = self._lease
        if lease is None or lease.connection_pool is not client.connection_pool:
            await self.release()  # the first read, or a new master: lease a connection
            lease = self._lease = client.client()
        blocked = await reader_id(lease)
        if self.stopping:
            return None
        self._blocked = blocked
        try:
            return await read(lease)
        finally:
            self._blocked = None

    async def parked(self, step: Awaitable[T]) -> T:
        """Await `step` (a handler, a sleep) as a point where `stop()` may cancel the task."""
        self._parking = True
        try:
            return await step
        finally:
            self._parking = False

    async def release(self) -> None:
        """Give the connection back to its pool (the task's last step)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.aclose()

    async def stop(
        self,
        task: asyncio.Task[None],
        connector: RedisConnector,
        *,
        longest_read: float,
        cancel: Callable[[asyncio.Task[None]], Awaitable[None]],
    ) -> None:
        """End `task`: wake its blocked read and let it return; cancel it where that is free.

        Also cancelled when it is still busy `longest_read` + `socket_timeout` later (the
        master is away), or when this call is cancelled.
        """
        self.stopping = True
        try:
            await self._wake(task, connector, longest_read + connector.settings.socket_timeout)
        finally:
            await cancel(task)  # at once if it ended (the usual case)

    async def _wake(
        self, task: asyncio.Task[None], connector: RedisConnector, bound: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        while not task.done() and loop.time() < deadline:
            if self._parking:
                return  # in a handler or a sleep: cancel it
            blocked = self._blocked
            if blocked is None:  # in a short command: it ends without reading again
                await asyncio.wait({task}, timeout=LOOK_AGAIN)
                continue

            async def unblock(client: Any, blocked: int = blocked) -> Any:
                return await client.client_unblock(blocked)

            try:
                woken = await connector.run(unblock, policy=ONCE, what="CLIENT UNBLOCK")
            except LoomHAError:
                return  # the master is away: the read fails anyway
            # Not woken: the read has not reached Redis yet (or its reply is on its way).
            rest = max(0.0, deadline - loop.time())
            await asyncio.wait({task}, timeout=rest if woken else LOOK_AGAIN)
