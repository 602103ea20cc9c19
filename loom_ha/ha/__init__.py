"""High availability on top of any transport: reconnect, failover, outbox, dedup.

This layer knows no broker: the dedup windows shared between instances sit with their
broker, `loom_ha.redis.RedisDedup` and `loom_ha.nats.NatsDedup`.
"""

from loom_ha.ha.dedup import DedupWindow, MemoryDedup, idempotency_key
from loom_ha.ha.failover import HATransport
from loom_ha.ha.outbox import OutboxConfig, OutboxPolicy

__all__ = [
    "DedupWindow",
    "HATransport",
    "MemoryDedup",
    "OutboxConfig",
    "OutboxPolicy",
    "idempotency_key",
]
