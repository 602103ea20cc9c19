"""StreamsOwner: what a Redis Streams consumer needs of its transport, as a protocol.

The consumer reads settings and counters of its transport and uses its codec, dead-letter
place and connector through this narrow interface, so it never imports the transport
(no module cycle between `streams` and `_consumer`).
"""

from __future__ import annotations

from typing import Any, Protocol

from loom_ha._delivery import LocalDelivery
from loom_ha.deadletter import DeadLetter
from loom_ha.policy import DeliveryPolicy
from loom_ha.redis.connection import RedisConnector
from loom_ha.retry import RetryPolicy


class StreamsOwner(Protocol):
    """What a `StreamConsumer` needs of its transport (`RedisStreamsTransport` has it)."""

    @property
    def backend(self) -> str: ...

    local: LocalDelivery
    policy: DeliveryPolicy
    publish_policy: RetryPolicy
    block: float
    batch: int
    discovery_interval: float
    claim_interval: float
    claim_idle: float
    consumer_name: str
    groups_recreated: int
    trimmed: int

    @property
    def connector(self) -> RedisConnector: ...
    def stream_key(self, topic: str) -> bytes: ...
    def topic_of(self, stream: bytes) -> str: ...
    async def known_streams(self, *, fresh: bool = False) -> list[bytes]: ...
    def decode(self, raw: bytes | None, topic: str, origin: str) -> Any | None: ...
    async def dead_letter(self, letter: DeadLetter) -> None: ...
