"""RedisRegistry: one Redis key per instance, expiring with its TTL; watches poll.

Key ``<prefix>:<service>:<instance id>`` holds the instance as JSON and is written with
``SET ... PX <ttl>``; each heartbeat rewrites it with ``XX`` (only if it still exists), so
a missing key (expired, flushed, Redis restarted empty) makes the heartbeat register again.
A heartbeat round sends those ``SET``s for every instance of the process in one pipeline:
one round trip per interval, however many instances.

Watches poll (SCAN + MGET every `poll_interval`) rather than use keyspace notifications:
polling needs no ``CONFIG SET`` (often forbidden on managed Redis), and Redis emits
``expired`` events only when its expiry cycle actually deletes a key, which can lag the TTL.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from typing_extensions import override

from loom_ha._redact import without_credentials
from loom_ha._tasks import honouring_cancel
from loom_ha.discovery.base import ServiceRegistry
from loom_ha.discovery.instance import Health, ServiceInstance
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError

__all__ = ["RedisRegistry"]

_SCHEMES = ("redis", "rediss", "unix")


@contextlib.contextmanager
def map_redis_errors(endpoint: str) -> Iterator[None]:
    """Translate redis-py errors into loom-ha's, keeping the cause."""
    try:
        yield
    except redis.exceptions.AuthenticationError as exc:  # a ConnectionError, but never transient
        raise RegistryError(f"redis at {endpoint} refused the credentials: {exc}") from exc
    except (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.BusyLoadingError,
        OSError,
    ) as exc:
        raise RegistryUnavailableError(f"redis at {endpoint} unavailable: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        raise RegistryError(f"redis at {endpoint} refused: {exc}") from exc


class RedisRegistry(ServiceRegistry):
    """A registry on one Redis server (or anything speaking its protocol).

    There is no critical phase: an instance whose heartbeat stops vanishes when its key
    expires, and `deregister_after` is not used. An instance that reports itself critical
    stays listed (not passing) while it keeps heartbeating.
    """

    backend = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "loom:svc",
        poll_interval: float = 0.25,
        ttl: float = 10.0,
        interval: float | None = None,
        timeout: float = 5.0,
        watch_wait: float = 10.0,
        probe_timeout: float | None = None,
        max_connections: int = 8,
    ) -> None:
        """`ttl`, `interval`, `timeout`, `watch_wait`, `probe_timeout`: see `ServiceRegistry`.

        Args:
            url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS).
            prefix: key prefix; keys are ``<prefix>:<service>:<instance id>``.
            poll_interval: how often a watched service is read again, seconds (one read
                per service and interval, however many watches follow it).
            max_connections: most connections open to Redis at once; more concurrent
                calls wait (up to `timeout`) for one to be free.

        Raises:
            ConfigurationError: `url` is not a Redis URL (named in the message).
        """
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in _SCHEMES:
            raise ConfigurationError(
                f"invalid Redis registry URL scheme {scheme!r}: expected redis://host:port/db"
            )
        shown = without_credentials(url)
        if poll_interval <= 0:
            raise ConfigurationError(f"poll_interval must be > 0, got {poll_interval}")
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, got {max_connections}")
        super().__init__(
            ttl=ttl,
            interval=interval,
            timeout=timeout,
            watch_wait=watch_wait,
            probe_timeout=probe_timeout,
            concurrency=max_connections,
            endpoint=shown,
        )
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                # One more than the calls' slots: the heartbeat pipeline is not queued.
                url,
                max_connections=max_connections + 1,
                timeout=timeout,
                socket_timeout=timeout,
            )
            self._redis = aioredis.Redis.from_pool(pool)
        except ValueError as exc:
            raise ConfigurationError(f"invalid Redis URL {shown!r}: {exc}") from None
        self.prefix = prefix
        self.poll_interval = poll_interval
        # service -> (fingerprint of the last answer, index handed out for it)
        self._versions: dict[str, tuple[tuple[object, ...], int]] = {}
        self._last_index = 1

    @override
    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return map_redis_errors(self.endpoint)

    def key(self, instance: ServiceInstance) -> str:
        """The Redis key of `instance`."""
        return f"{self.prefix}:{instance.service}:{instance.instance_id}"

    @override
    async def _put(self, instance: ServiceInstance, ttl: float) -> None:
        await honouring_cancel(self._redis.set(self.key(instance), _encode(instance), px=_ms(ttl)))

    @override
    async def _pulse(self, instance: ServiceInstance, ttl: float) -> bool:
        done = await self._redis.set(self.key(instance), _encode(instance), px=_ms(ttl), xx=True)
        return bool(done)

    @override
    async def _pulse_all(
        self,
        instances: Sequence[ServiceInstance],
        changed: Sequence[ServiceInstance],
        ttl: float,
    ) -> list[ServiceInstance]:
        # Every key is rewritten (that is what refreshes its TTL), so `changed` needs nothing
        # more; one pipeline, one round trip.
        if not instances:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for instance in instances:
            pipe.set(self.key(instance), _encode(instance), px=_ms(ttl), xx=True)
        done = await honouring_cancel(pipe.execute())
        return [i for i, ok in zip(instances, done, strict=True) if not ok]

    @override
    async def _remove(self, instance: ServiceInstance) -> None:
        await honouring_cancel(self._redis.delete(self.key(instance)))

    @override
    async def _remove_all(self, instances: Sequence[ServiceInstance]) -> None:
        if not instances:
            return
        await self._call(
            honouring_cancel(self._redis.delete(*(self.key(i) for i in instances))),
            self.timeout,
        )

    @override
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]:
        waited = 0.0
        while True:
            found = await self._read(service)
            current = self._version(service, found)
            if index == 0 or current > index or waited >= wait or self.closed:
                return current, found
            step = min(self.poll_interval, wait - waited)
            await self._sleep_unless_closed(step)
            waited += step

    @override
    async def _services(self) -> list[str]:
        names: set[str] = set()
        for key in await honouring_cancel(self._scan(f"{self.prefix}:*")):
            names.add(key[len(self.prefix) + 1 :].split(":", 1)[0])
        return list(names)

    @override
    async def _close(self) -> None:
        await self._redis.aclose()

    async def _read(self, service: str) -> list[ServiceInstance]:
        keys = await honouring_cancel(self._scan(f"{self.prefix}:{service}:*"))
        values = await honouring_cancel(self._redis.mget(keys)) if keys else []
        # A key may expire between SCAN and MGET: its value is then None.
        decoded = (_decode(v) for v in values if v is not None)
        return [i for i in decoded if i is not None]

    async def _scan(self, match: str) -> list[str]:
        return [k.decode() async for k in self._redis.scan_iter(match=match, count=500)]

    def _version(self, service: str, found: list[ServiceInstance]) -> int:
        """A per-service index that grows whenever the answer (ignoring heartbeats) changes."""
        fingerprint = tuple(sorted(i.identity() for i in found))
        previous = self._versions.get(service)
        if previous is not None and previous[0] == fingerprint:
            return previous[1]
        self._last_index += 1
        self._versions[service] = (fingerprint, self._last_index)
        return self._last_index


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _encode(instance: ServiceInstance) -> str:
    return json.dumps(
        {
            "service": instance.service,
            "instance_id": instance.instance_id,
            "address": instance.address,
            "tags": list(instance.tags),
            "meta": dict(instance.meta),
            "weight": instance.weight,
            "health": instance.health.value,
            "note": instance.note,
            "last_heartbeat": instance.last_heartbeat,
        }
    )


def _decode(raw: bytes | str) -> ServiceInstance | None:
    """The instance stored in a key, or None for a value loom-ha did not write."""
    try:
        data: dict[str, Any] = json.loads(raw)
        return _instance(data)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _instance(data: dict[str, Any]) -> ServiceInstance:
    return ServiceInstance(
        service=data["service"],
        instance_id=data["instance_id"],
        address=data.get("address", ""),
        tags=tuple(data.get("tags", ())),
        meta=data.get("meta", {}),
        weight=int(data.get("weight", 1)),
        health=Health(data.get("health", "passing")),
        note=data.get("note", ""),
        last_heartbeat=data.get("last_heartbeat"),
    )
