"""Redis transports announce RECONNECTING and CONNECTED as they happen (nobody polls).

Before, a Redis transport computed RECONNECTING only when `statistics()` was read, so
HATransport had to poll it. These tests never read the state while waiting: they wait for
what the listeners heard.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from loom_ha.ha import HATransport
from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport
from loom_ha.testing.backend import make_event
from loom_ha.testing.collect import Collector
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.transport import TransportState

pytestmark = pytest.mark.redis

# Bound of each wait for an announcement: the master is declared lost within
# `socket_timeout` (0.5 s here) and found again within the reconnect backoff (<= 1 s); the
# rest is room for a loaded 2-core CI machine.
WITHIN = 20.0


class Heard:
    """The states a listener was told, and a way to wait for one."""

    def __init__(self) -> None:
        self.states: list[TransportState] = []
        self._changed = asyncio.Event()

    def __call__(self, state: TransportState) -> None:
        self.states.append(state)
        self._changed.set()

    async def wait_for(self, state: TransportState, *, after: int = 0) -> int:
        """Wait until `state` was heard at an index >= `after`; returns that index."""
        async with asyncio.timeout(WITHIN):
            while state not in self.states[after:]:
                self._changed.clear()
                await self._changed.wait()
        return self.states.index(state, after)


async def test_streams_announce_a_lost_and_a_found_master(server_launcher: ServerLauncher) -> None:
    """Redis stopped: RECONNECTING is announced; Redis back on its port: CONNECTED."""
    server = await asyncio.to_thread(server_launcher.redis)
    heard = Heard()
    async with RedisStreamsTransport(server.url, socket_timeout=0.5) as t:
        t.add_state_listener(heard)
        await asyncio.to_thread(server.stop)
        lost = await heard.wait_for(TransportState.RECONNECTING)
        await asyncio.to_thread(server.start)
        await heard.wait_for(TransportState.CONNECTED, after=lost)
    assert heard.states[-1] is TransportState.DISCONNECTED, heard.states


async def test_pubsub_announces_its_listener_going_and_coming_back(
    server_launcher: ServerLauncher,
) -> None:
    """The Pub/Sub listener's connection killed: RECONNECTING while it is away (events for it
    would be lost), CONNECTED once it listens again."""
    server = await asyncio.to_thread(server_launcher.redis)
    heard = Heard()
    async with RedisPubSubTransport(server.url) as t:
        await t.subscribe("state/x", Collector())
        t.add_state_listener(heard)
        async with aioredis.Redis.from_url(server.url) as raw:
            await raw.client_kill_filter(_type="pubsub")
        lost = await heard.wait_for(TransportState.RECONNECTING)
        await heard.wait_for(TransportState.CONNECTED, after=lost)


async def test_ha_recovers_through_announcements_not_polling(
    server_launcher: ServerLauncher,
) -> None:
    """HATransport with its poll made useless (once an hour) still notices a lost master at
    once, counts the reconnect and keeps delivering after it."""
    server = await asyncio.to_thread(server_launcher.redis)
    heard, got = Heard(), Collector()
    inner = RedisStreamsTransport(server.url, socket_timeout=0.5, block=0.3)
    async with HATransport(inner, health_interval=3600) as ha:
        await ha.subscribe("state/y", got, group="g")
        ha.add_state_listener(heard)
        await asyncio.to_thread(server.restart)
        lost = await heard.wait_for(TransportState.RECONNECTING)
        await heard.wait_for(TransportState.CONNECTED, after=lost)
        event = make_event(1)
        await ha.publish("state/y", event)
        await got.wait_for(1, within=WITHIN)
        assert ha.statistics().reconnects >= 1
    assert got.ids == [event.id]
