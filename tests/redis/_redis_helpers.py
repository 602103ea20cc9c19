"""Waiting helpers for the Redis tests (importable because tests/redis is on sys.path)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loom_ha.testing.redis_sentinel import RedisSentinelCluster
from loom_ha.testing.servers import RedisServer


async def eventually(condition: Callable[[], object], within: float = 10.0) -> None:
    """Wait until `condition()` is true, polling: statistics() has no change notification."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling statistics() is the point
            await asyncio.sleep(0.02)


async def while_frozen(server: RedisServer, call: Awaitable[Any], seconds: float = 1.0) -> None:
    """Run `call` while Redis is frozen (SIGSTOP) for `seconds`, then wait for it to finish.

    What `call` writes meanwhile reaches the socket, but Redis runs it only after the
    resume: with a shorter `socket_timeout` the reply is lost though the command ran.
    """
    server.pause()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(call)  # type: ignore[arg-type]
            await asyncio.sleep(seconds)
            server.resume()
    finally:
        server.resume()


async def eventually_async(
    condition: Callable[[], Awaitable[object]], within: float = 10.0
) -> None:
    """`eventually` for a condition that asks a server (awaitable)."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 - polling the server is the point
            await asyncio.sleep(0.02)


def master_other_than(cluster: RedisSentinelCluster, old: tuple[str, int]) -> float:
    """Block until the sentinels name a master other than `old`; returns that moment."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if cluster.master_address() != old:
                return time.monotonic()
        except ConnectionError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"no failover away from {old}")
