"""High availability on top of any transport: reconnect, failover, outbox, dedup.

`NatsDedup` loads nats-py, so it is imported lazily (only by programs that use it).
"""

from typing import TYPE_CHECKING, Any

from loom_ha.ha.dedup import DedupWindow, MemoryDedup, RedisDedup, idempotency_key
from loom_ha.ha.failover import HATransport
from loom_ha.ha.outbox import OutboxConfig, OutboxPolicy

if TYPE_CHECKING:
    from loom_ha.ha.nats_dedup import NatsDedup

__all__ = [
    "DedupWindow",
    "HATransport",
    "MemoryDedup",
    "NatsDedup",
    "OutboxConfig",
    "OutboxPolicy",
    "RedisDedup",
    "idempotency_key",
]


def __getattr__(name: str) -> Any:
    if name == "NatsDedup":
        from loom_ha.ha.nats_dedup import NatsDedup

        return NatsDedup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
