"""Service discovery: registries (Consul, Redis, in-memory), TTL heartbeats, watches, health gating.

Importing this package imports no client library: `ConsulRegistry` (py-consul) and
`RedisRegistry` (redis-py) load theirs when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom_ha.discovery.base import Registration, RegistryStatistics, ServiceRegistry
from loom_ha.discovery.health import HealthCheck, HealthGate
from loom_ha.discovery.instance import Health, ServiceInstance, ServiceSnapshot
from loom_ha.discovery.memory import MemoryRegistry, MemoryStore
from loom_ha.discovery.watch import Watch
from loom_ha.errors import ConfigurationError

if TYPE_CHECKING:
    from loom_ha.discovery.consul import ConsulRegistry
    from loom_ha.discovery.redis import RedisRegistry

__all__ = [
    "ConsulRegistry",
    "Health",
    "HealthCheck",
    "HealthGate",
    "MemoryRegistry",
    "MemoryStore",
    "RedisRegistry",
    "Registration",
    "RegistryStatistics",
    "ServiceInstance",
    "ServiceRegistry",
    "ServiceSnapshot",
    "Watch",
    "open_registry",
]


def open_registry(url: str, **options: Any) -> ServiceRegistry:
    """A registry for `url`: ``consul://``/``consul+https://``, ``redis://``/``rediss://``,
    or ``memory://`` (private to this registry object).

    `options` go to the registry's constructor (``ttl=``, ``token=``, ...).

    Raises:
        ConfigurationError: unknown scheme (named in the message) or a bad URL.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("consul", "consul+https"):
        from loom_ha.discovery.consul import ConsulRegistry

        return ConsulRegistry(url, **options)
    if scheme in ("redis", "rediss", "unix"):
        from loom_ha.discovery.redis import RedisRegistry

        return RedisRegistry(url, **options)
    if scheme == "memory":
        return MemoryRegistry(**options)
    raise ConfigurationError(
        f"registry URL scheme {scheme!r} is not one of consul://, consul+https://, redis://, "
        "rediss://, memory://"  # never the URL itself: it may hold a token or password
    )


def __getattr__(name: str) -> Any:
    # Lazy: only the backend a program uses imports its client library.
    if name == "ConsulRegistry":
        from loom_ha.discovery.consul import ConsulRegistry

        return ConsulRegistry
    if name == "RedisRegistry":
        from loom_ha.discovery.redis import RedisRegistry

        return RedisRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
