"""High availability on top of any transport: reconnect, failover, outbox, dedup."""

from loom_ha.ha.dedup import DedupWindow, MemoryDedup, RedisDedup, idempotency_key
from loom_ha.ha.failover import HATransport
from loom_ha.ha.outbox import OutboxConfig, OutboxPolicy

__all__ = [
    "DedupWindow",
    "HATransport",
    "MemoryDedup",
    "OutboxConfig",
    "OutboxPolicy",
    "RedisDedup",
    "idempotency_key",
]
