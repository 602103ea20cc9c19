"""Subscribing and unsubscribing while HATransport is reconnecting, on a real broker.

Both are recorded at once and applied when the broker is back, before the outbox replays:
a handler subscribed during the outage receives what is published after it, and one
unsubscribed during the outage receives nothing more. The inner transports here reconnect by
themselves (the same client object), which is the path that used to drop both changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loom_ha.config import create_transport
from loom_ha.event import CloudEvent
from loom_ha.testing.collect import Collector
from loom_ha.transport import TransportState

pytestmark = pytest.mark.chaos


def _event(n: int) -> CloudEvent:
    return CloudEvent.create(source="/test/ha-resubscribe", type="t", data=n)


async def _state(transport: Any, wanted: TransportState) -> None:
    async with asyncio.timeout(20):  # generous: a server start on a loaded machine
        while transport.state is not wanted:  # noqa: ASYNC110 - the state is the signal
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "broker",
    [pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)],
)
async def test_changes_made_while_reconnecting_apply_when_the_broker_is_back(
    server_launcher: Any, broker: str
) -> None:
    """Kept, added and removed subscriptions across a broker restart (core / Pub/Sub)."""
    if broker == "nats":
        server = server_launcher.nats()
        url = f"{server.url}?mode=core"
    else:
        server = server_launcher.redis()
        url = f"{server.url}?mode=pubsub"
    kept, added, removed = Collector(), Collector(), Collector()
    async with create_transport(url) as transport:
        await transport.subscribe("resub/kept", kept)
        await transport.subscribe("resub/removed", removed)
        await asyncio.to_thread(server.stop)
        await _state(transport, TransportState.RECONNECTING)
        await transport.subscribe("resub/added", added)
        await transport.unsubscribe("resub/removed", removed)
        await asyncio.to_thread(server.start)
        await _state(transport, TransportState.CONNECTED)
        sent = {topic: _event(n) for n, topic in enumerate(("kept", "added", "removed"))}
        for topic, event in sent.items():
            await transport.publish(f"resub/{topic}", event)
        await kept.wait_for(1, within=10)
        await added.wait_for(1, within=10)
        # `removed` is checked after a marker published behind its event has arrived.
        marker = _event(99)
        await transport.publish("resub/kept", marker)
        await kept.wait_for(2, within=10)
        stats = transport.statistics()
    assert kept.ids == [sent["kept"].id, marker.id]
    assert added.ids == [sent["added"].id]
    assert removed.ids == []
    assert stats.subscriptions == 2
