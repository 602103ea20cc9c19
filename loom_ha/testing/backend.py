"""`Backend`: how the conformance suites build transports of one backend, and their events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from loom_ha.deadletter import DeadLetter
from loom_ha.event import CloudEvent
from loom_ha.policy import DeliveryPolicy
from loom_ha.transport import Capabilities, Transport


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Small limits the durability suite asks `Backend.limited` to build a transport with.

    Attributes:
        policy: handler attempts and backoff before an event is dead-lettered.
        max_event_size: the codec refuses (as malformed) received events bigger than this.
        abandon_after: seconds after which a delivery no consumer settled goes to another
            group member (JetStream's ``ack_wait``, Redis Streams' ``claim_idle``); None
            keeps the backend's default.
    """

    policy: DeliveryPolicy
    max_event_size: int
    abandon_after: float | None = None


@dataclass(frozen=True)
class Backend:
    """How the suite builds transports of one backend.

    Attributes:
        name: shown in test ids and messages.
        factory: returns a new, unconnected transport on the same broker.
        capabilities: what the backend declares (usually ``TransportClass.capabilities``).
        limited: returns a new, unconnected transport like `factory`'s, configured with the
            given `Limits` (delivery policy, codec size limit).
        inject_raw: puts raw bytes on the wire of a topic, as a foreign publisher would
            (``inject_raw(topic, payload)``).
        dead_letters: reads back every dead letter of a topic from the backend's durable
            dead-letter place (``await dead_letters(topic)``).
        unacked: how many events of a topic the broker holds as delivered to a group but not
            acknowledged (``await unacked(topic, group)``).

    The last four are optional hooks of the durability half of the suite
    (`loom_ha.testing.durability`): a test that needs `limited`, `inject_raw` or
    `dead_letters` skips without them and says so; without `unacked` the tests do not
    check that the broker received the acknowledgements.

    Negative checks ("nothing else arrives") never wait a fixed time: they publish a
    marker after the events under test and wait for it (`publish_markers`).
    """

    name: str
    factory: Callable[[], Transport]
    capabilities: Capabilities
    limited: Callable[[Limits], Transport] | None = None
    inject_raw: Callable[[str, bytes], Awaitable[None]] | None = None
    dead_letters: Callable[[str], Awaitable[list[DeadLetter]]] | None = None
    unacked: Callable[[str, str], Awaitable[int]] | None = None

    @asynccontextmanager
    async def peers(self, count: int = 1) -> AsyncIterator[list[Transport]]:
        """`count` connected transports that talk to each other, disconnected at exit.

        Backends without `cross_instance` share one transport object instead.
        """
        async with AsyncExitStack() as stack:
            if self.capabilities.cross_instance:
                made = [self.factory() for _ in range(count)]
            else:
                made = [self.factory()]
            for transport in made:
                await stack.enter_async_context(transport)
            yield [made[i % len(made)] for i in range(count)]


def make_event(n: int = 0, *, source: str = "/node/conformance", **data: Any) -> CloudEvent:
    """A numbered event; its id is unique per call."""
    return CloudEvent.create(source=source, type="conformance.event", data={"n": n, **data})


async def publish_numbered(transport: Transport, topic: str, count: int) -> list[str]:
    """Publish `count` numbered events on `topic`; returns their ids in publish order."""
    ids = []
    for n in range(count):
        event = make_event(n)
        await transport.publish(topic, event)
        ids.append(event.id)
    return ids


async def publish_one(transport: Transport, topic: str) -> str:
    """Publish one new event on `topic`; returns its id."""
    event = make_event()
    await transport.publish(topic, event)
    return event.id
