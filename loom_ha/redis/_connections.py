"""redis-py connections whose writes cost no task.

redis-py bounds a write with ``asyncio.wait_for`` when a socket timeout is set; on
Python 3.11 that wraps every command in a new task and two extra trips through
the event loop (counted: 4.6 loop iterations per back-to-back PUBLISH against
2.0 without it). These classes bound the write with ``asyncio.timeout`` instead
(one timer, no task) and leave everything else to redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection


class _TimerBoundWrites(AbstractConnection):
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
