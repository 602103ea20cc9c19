"""Redis backends for loom-ha: Pub/Sub (at-most-once), Streams (at-least-once), or both.

Importing this package imports redis-py; ``import loom_ha`` alone never does.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "loom_ha.redis needs the redis client library: pip install 'loom-ha[redis]'"
    ) from exc

from loom_ha.redis._errors import map_redis_errors
from loom_ha.redis.dedup import RedisDedup
from loom_ha.redis.pubsub import RedisPubSubTransport
from loom_ha.redis.streams import RedisStreamsTransport
from loom_ha.redis.topic_modes import Mode, ModeRouter
from loom_ha.redis.transport import RedisTransport
from loom_ha.redis.url import RedisSettings, parse_redis_url

__all__ = [
    "Mode",
    "ModeRouter",
    "RedisDedup",
    "RedisPubSubTransport",
    "RedisSettings",
    "RedisStreamsTransport",
    "RedisTransport",
    "map_redis_errors",
    "parse_redis_url",
]
