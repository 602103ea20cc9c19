"""MemoryRegistry: the embedded, in-process registry (the default when no server is configured).

TTLs are honoured like Consul's: an instance whose heartbeat stops goes critical when its TTL
expires and is removed `deregister_after` seconds later. Watches block on an event that every
change (and every TTL expiry, computed lazily) sets; no background task is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from typing_extensions import override

from loom_ha._tasks import wait_event
from loom_ha.discovery.base import ServiceRegistry
from loom_ha.discovery.instance import Health, ServiceInstance

__all__ = ["MemoryRegistry", "MemoryStore"]


@dataclass
class _Entry:
    instance: ServiceInstance
    expires: float  # monotonic time the TTL runs out
    deregister_after: float


class MemoryStore:
    """State shared by the `MemoryRegistry` objects of one process.

    Registries made without a store get their own; pass one store to several registries so
    they see each other (as processes sharing a Consul would).
    """

    def __init__(self) -> None:
        self._services: dict[str, dict[str, _Entry]] = {}
        self._indexes: dict[str, int] = {}
        self._last_index = 1
        self._changed = asyncio.Event()

    def index(self, service: str) -> int:
        """The index of the last change of `service` (>= 1)."""
        return self._indexes.get(service, 1)

    def bump(self, service: str) -> None:
        """Record a change of `service` and wake every waiter."""
        self._last_index += 1
        self._indexes[service] = self._last_index
        self.wake()

    def wake(self) -> None:
        """Wake every waiter (they re-check their condition)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def put(self, instance: ServiceInstance, ttl: float, deregister_after: float) -> None:
        """Create or replace an entry."""
        entries = self._services.setdefault(instance.service, {})
        entries[instance.instance_id] = _Entry(instance, time.monotonic() + ttl, deregister_after)
        self.bump(instance.service)

    def pulse(self, instance: ServiceInstance, ttl: float, *, swept: bool = False) -> bool:
        """Refresh an entry's TTL and health; False when it does not exist.

        `swept`: the caller swept the instance's service just now (a heartbeat round sweeps
        each service once, not once per instance).
        """
        if not swept:
            self.sweep(instance.service)
        entry = self._services.get(instance.service, {}).get(instance.instance_id)
        if entry is None:
            return False
        changed = entry.instance.identity() != instance.identity()
        entry.instance = instance
        entry.expires = time.monotonic() + ttl
        if changed:
            self.bump(instance.service)
        return True

    def remove(self, service: str, instance_id: str) -> None:
        """Delete an entry if present."""
        entries = self._services.get(service, {})
        if entries.pop(instance_id, None) is not None:
            if not entries:
                del self._services[service]
            self.bump(service)

    def sweep(self, service: str) -> float:
        """Apply TTL expiry and reaping to `service`; return when the next one is due."""
        now = time.monotonic()
        upcoming = float("inf")
        entries = self._services.get(service, {})
        for instance_id, entry in list(entries.items()):
            if entry.instance.health is not Health.CRITICAL and now >= entry.expires:
                entry.instance = entry.instance.with_health(Health.CRITICAL, note="TTL expired")
                self.bump(service)
            if entry.instance.health is Health.CRITICAL and entry.expires <= now:
                reap_at = entry.expires + entry.deregister_after
                if now >= reap_at:
                    self.remove(service, instance_id)
                    continue
                upcoming = min(upcoming, reap_at)
            else:
                upcoming = min(upcoming, entry.expires)
        return upcoming

    def instances(self, service: str) -> list[ServiceInstance]:
        """Every entry of `service` (after a sweep)."""
        return [e.instance for e in self._services.get(service, {}).values()]

    def services(self) -> list[str]:
        """Services with at least one entry."""
        for service in list(self._services):
            self.sweep(service)
        return list(self._services)

    async def wait_changed(self, limit: float) -> None:
        """Wait until any change (or `limit` seconds)."""
        await wait_event(self._changed, max(0.0, limit))


class MemoryRegistry(ServiceRegistry):
    """A registry living in this process; share a `MemoryStore` between registries."""

    backend = "memory"

    def __init__(
        self,
        store: MemoryStore | None = None,
        *,
        ttl: float = 10.0,
        interval: float | None = None,
        timeout: float = 5.0,
        deregister_after: float = 60.0,
        watch_wait: float = 10.0,
        probe_timeout: float | None = None,
    ) -> None:
        """`ttl`, `interval`, `timeout`, `deregister_after`, `watch_wait`, `probe_timeout`: see
        `ServiceRegistry`.

        Args:
            store: shared state; a new private one by default.
        """
        super().__init__(
            ttl=ttl,
            interval=interval,
            timeout=timeout,
            deregister_after=deregister_after,
            watch_wait=watch_wait,
            probe_timeout=probe_timeout,
            endpoint="memory://",
        )
        self.store = store if store is not None else MemoryStore()

    @override
    async def _put(self, instance: ServiceInstance, ttl: float) -> None:
        self.store.put(instance, ttl, self.deregister_after)

    @override
    async def _pulse(self, instance: ServiceInstance, ttl: float) -> bool:
        return self.store.pulse(instance, ttl)

    @override
    async def _pulse_all(
        self,
        instances: Sequence[ServiceInstance],
        changed: Sequence[ServiceInstance],
        ttl: float,
    ) -> list[ServiceInstance]:
        for service in {i.service for i in instances}:
            self.store.sweep(service)
        return [i for i in instances if not self.store.pulse(i, ttl, swept=True)]

    @override
    async def _remove(self, instance: ServiceInstance) -> None:
        self.store.remove(instance.service, instance.instance_id)

    @override
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]:
        deadline = time.monotonic() + wait
        while True:
            upcoming = self.store.sweep(service)
            current = self.store.index(service)
            now = time.monotonic()
            if index == 0 or current > index or now >= deadline or self.closed:
                return current, self.store.instances(service)
            await self.store.wait_changed(min(deadline, upcoming) - now)

    @override
    async def _services(self) -> list[str]:
        return self.store.services()

    @override
    async def _close(self) -> None:
        # Wake this registry's watches blocked in `_query`, so they see the close.
        self.store.wake()
