"""Subscribe/unsubscribe churn over Redis Streams reuses connections (request/reply pattern).

`HALoomApp.run()` subscribes its reply topics before each call and unsubscribes them
after it: stopping a reader used to cancel its blocked XREAD, which costs the
connection, so each cycle opened a new one (2 per call, thousands of TIME-WAIT sockets).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from loom_ha.event import CloudEvent
from loom_ha.redis import RedisStreamsTransport
from loom_ha.testing.servers import RedisServer

pytestmark = pytest.mark.redis

CYCLES = 200
# The pools' connections a transport opens while warming up may still grow by a few
# (a command and a read overlapping); one per cycle is the bug.
MOST_NEW_CONNECTIONS = 5


async def _connections_received(raw: aioredis.Redis) -> int:
    return int((await raw.info("stats"))["total_connections_received"])


@pytest.mark.parametrize("group", [None, "workers"])
async def test_churn_opens_no_connection_per_cycle_and_unsubscribed_handler_gets_nothing(
    redis_server: RedisServer, raw: aioredis.Redis, tag: str, group: str | None
) -> None:
    """200 subscribe/deliver/unsubscribe cycles open at most a few server-side connections."""
    topic = tag + "reply"
    seen: list[int] = []
    arrived = asyncio.Event()

    async def handler(event: Any) -> None:
        seen.append(event.data["n"])
        arrived.set()

    async def cycle(t: RedisStreamsTransport, n: int) -> None:
        await t.subscribe(topic, handler, group=group)
        arrived.clear()
        await t.publish(topic, CloudEvent.create(source="/churn", type="t", data={"n": n}))
        await asyncio.wait_for(arrived.wait(), 10)  # the reader is back in XREAD after this
        await t.unsubscribe(topic, handler)

    async with RedisStreamsTransport(redis_server.url) as t:
        await cycle(t, -1)  # warm up: the pools open their first connections
        before = await _connections_received(raw)
        for n in range(CYCLES):
            await cycle(t, n)
        after = await _connections_received(raw)

        witnessed = asyncio.Event()

        async def witness(event: Any) -> None:
            witnessed.set()

        await t.subscribe(topic, witness, group=group and group + "-witness")
        await t.publish(topic, CloudEvent.create(source="/churn", type="t", data={"n": -2}))
        await asyncio.wait_for(witnessed.wait(), 10)

    assert seen == [-1, *range(CYCLES)], "an unsubscribed handler was called"
    opened = after - before
    assert opened <= MOST_NEW_CONNECTIONS, f"{opened} new connections over {CYCLES} cycles"
