"""Which deliveries a shared dedup window may merge: competing ones only, never fan-out."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from loom_ha.ha import HATransport
from loom_ha.redis import RedisDedup, RedisPubSubTransport, RedisStreamsTransport
from loom_ha.testing.collect import (
    Collector,
    assert_all_received,
    collectors,
    publish_markers,
    without_markers,
)
from loom_ha.testing.conformance import make_event, publish_numbered
from loom_ha.testing.servers import RedisServer
from loom_ha.transport import Transport

pytestmark = pytest.mark.redis

MODES: dict[str, Callable[[str], Transport]] = {
    "pubsub": RedisPubSubTransport,
    "streams": RedisStreamsTransport,
}


@pytest.mark.parametrize("mode", MODES)
async def test_a_shared_window_never_merges_fan_out_deliveries(
    redis_server: RedisServer, mode: str
) -> None:
    """Two instances sharing a Redis window each get every reply (fan-out). The same handler
    object sits in both, as identical code in two processes often has equal `id()`s: the
    window used to drop the second instance's copy (Loom's replies went missing)."""
    tag = uuid.uuid4().hex[:10]
    make = MODES[mode]
    a = HATransport(make(redis_server.url), dedup=RedisDedup(redis_server.url, prefix=tag))
    b = HATransport(make(redis_server.url), dedup=RedisDedup(redis_server.url, prefix=tag))
    topic = f"node.response/node/{tag}"
    got = Collector()
    async with a, b:
        await a.subscribe(topic, got)
        await b.subscribe(topic, got)
        event = make_event()
        await a.publish(topic, event)
        await got.wait_for(2)
    assert got.ids == [event.id, event.id]


async def test_a_shared_window_merges_competing_deliveries(redis_server: RedisServer) -> None:
    """Requests (a group by Loom's rule) are handled once across instances."""
    tag = uuid.uuid4().hex[:10]
    url = redis_server.url
    a = HATransport(RedisStreamsTransport(url), dedup=RedisDedup(url, prefix=tag))
    b = HATransport(RedisStreamsTransport(url), dedup=RedisDedup(url, prefix=tag))
    assert a.resolve_group(f"node.request/node/{tag}", None) == f"node.request/node/{tag}"
    first, second = collectors("a", "b")
    async with a, b:
        await a.subscribe(f"node.request/node/{tag}", first)
        await b.subscribe(f"node.request/node/{tag}", second)
        sent = await publish_numbered(a, f"node.request/node/{tag}", 20)
        await first.wait_until(
            lambda: len(set(first.ids) | set(second.ids)) >= 20, what=lambda: "requests"
        )
    assert_all_received(sent, first.ids + second.ids)


async def test_a_shared_window_survives_disconnect_and_connect(redis_server: RedisServer) -> None:
    """disconnect() releases the window's connections; connect() again and grouped deliveries
    are deduplicated through it as before (it used to be closed for good)."""
    tag = uuid.uuid4().hex[:10]
    url = redis_server.url
    ha = HATransport(RedisStreamsTransport(url), dedup=RedisDedup(url, prefix=tag))
    topic = f"node.request/node/{tag}"
    for _ in range(2):
        got = Collector()
        async with ha:
            await ha.subscribe(topic, got)
            event = make_event()
            await ha.publish(topic, event)
            await got.wait_for(1)
            await ha.publish(topic, event)  # the same id again: a duplicate
            markers = await publish_markers(ha, topic, got)
        assert without_markers(got.ids, markers) == [event.id]
