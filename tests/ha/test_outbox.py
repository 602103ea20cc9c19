"""The outbox: bounded, ordered, replaying the same events, honouring each policy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loom_ha.errors import ConfigurationError, ConnectionLostError, PublishError
from loom_ha.event import CloudEvent
from loom_ha.ha.outbox import Outbox, OutboxConfig, OutboxPolicy


def event(n: int) -> CloudEvent:
    """A numbered event."""
    return CloudEvent.create(source="/test", type="t", data={"n": n})


class Broker:
    """Where drained events go; can be told to be down."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []
        self.down = False

    async def send(self, topic: str, ev: Any) -> None:
        if self.down:
            raise ConnectionLostError("down")
        self.got.append((topic, ev))


async def test_block_waits_until_replayed_in_order_with_same_events() -> None:
    """BLOCK publishes return only once drained, in publish order, with the same objects."""
    outbox, broker = Outbox(OutboxConfig()), Broker()
    sent = [event(i) for i in range(5)]
    waiting = [asyncio.create_task(outbox.put("t", e)) for e in sent]
    await asyncio.sleep(0.01)
    assert outbox.depth == 5
    assert not any(t.done() for t in waiting)
    await outbox.drain(broker.send)
    await asyncio.gather(*waiting)
    assert [e for _, e in broker.got] == sent


async def test_block_times_out_with_publish_error_and_leaves_nothing() -> None:
    """A BLOCK publish not sent within its timeout raises PublishError and is removed."""
    outbox = Outbox(OutboxConfig(timeout=0.05))
    with pytest.raises(PublishError) as info:
        await outbox.put("t", event(1))
    assert info.value.topic == "t"
    assert outbox.depth == 0


async def test_block_waits_for_space_when_full() -> None:
    """A full outbox makes BLOCK publishers wait for space instead of dropping."""
    outbox, broker = Outbox(OutboxConfig(max_size=2, timeout=5)), Broker()
    first = [asyncio.create_task(outbox.put("t", event(i))) for i in range(3)]
    await asyncio.sleep(0.01)
    assert outbox.depth == 2
    await outbox.drain(broker.send)
    await asyncio.sleep(0.01)
    await outbox.drain(broker.send)
    await asyncio.gather(*first)
    assert [e.data["n"] for _, e in broker.got] == [0, 1, 2]


async def test_fail_fast_raises_a_retryable_error() -> None:
    """FAIL_FAST never queues: it raises ConnectionLostError, which is transient."""
    outbox = Outbox(OutboxConfig(policy=OutboxPolicy.FAIL_FAST))
    with pytest.raises(ConnectionLostError):
        await outbox.put("t", event(1))
    assert outbox.depth == 0


async def test_drop_oldest_counts_what_it_drops() -> None:
    """DROP_OLDEST returns at once and, when full, drops (and counts) the oldest."""
    outbox, broker = Outbox(OutboxConfig(policy=OutboxPolicy.DROP_OLDEST, max_size=3)), Broker()
    for i in range(5):
        await outbox.put("t", event(i))
    assert (outbox.depth, outbox.dropped) == (3, 2)
    await outbox.drain(broker.send)
    assert [e.data["n"] for _, e in broker.got] == [2, 3, 4]


async def test_failed_drain_keeps_the_rest_in_order() -> None:
    """If the broker fails mid-drain, unsent events stay queued, in order."""
    outbox, broker = Outbox(OutboxConfig(policy=OutboxPolicy.DROP_OLDEST)), Broker()
    for i in range(3):
        await outbox.put("t", event(i))
    broker.down = True
    with pytest.raises(ConnectionLostError):
        await outbox.drain(broker.send)
    assert outbox.depth == 3
    broker.down = False
    await outbox.drain(broker.send)
    assert [e.data["n"] for _, e in broker.got] == [0, 1, 2]


async def test_per_call_policy_overrides_the_default() -> None:
    """A publish may choose FAIL_FAST even when the outbox defaults to BLOCK."""
    outbox = Outbox(OutboxConfig())
    with pytest.raises(ConnectionLostError):
        await outbox.put("t", event(1), policy=OutboxPolicy.FAIL_FAST)


async def test_cancelled_block_publish_leaves_the_outbox() -> None:
    """Cancelling a waiting publisher removes its event, so it is not replayed later."""
    outbox = Outbox(OutboxConfig())
    task = asyncio.create_task(outbox.put("t", event(1)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outbox.depth == 0


def test_bad_settings_fail_at_construction() -> None:
    """Nonsense sizes and timeouts are rejected, naming the option."""
    with pytest.raises(ConfigurationError, match="max_size"):
        OutboxConfig(max_size=0)
    with pytest.raises(ConfigurationError, match="timeout"):
        OutboxConfig(timeout=0)
