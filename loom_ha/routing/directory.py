"""`InstanceDirectory`: the passing instances of each service, kept fresh by registry watches.

Asking the registry on every request would put a registry round trip (and the registry's
availability) on the request path. Instead one watch per service (a Consul blocking
query) keeps a local list current; a request reads the list, never waits on the registry
once the first answer is in, and keeps using the last good list while the registry is
unreachable (the watch marks it stale).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from loom_ha._tasks import TaskSupervisor, wait_event
from loom_ha.discovery.base import ServiceRegistry
from loom_ha.discovery.instance import ServiceInstance
from loom_ha.errors import ConfigurationError, RegistryError
from loom_ha.retry import backoff_delay

__all__ = ["InstanceDirectory"]

log = logging.getLogger("loom_ha.routing")

Departed = Callable[[str, frozenset[str]], None]
"""Told (service, instance ids) when instances leave the passing set of a service."""


@dataclass
class _Entry:
    instances: tuple[ServiceInstance, ...] = ()
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stale: bool = False


class InstanceDirectory:
    """Passing instances per service; one watch task per service asked for.

    Args:
        registry: where instances are registered.
        tasks: owns the watch tasks (the caller cancels them on disconnect).
        first_answer: seconds a first lookup of a service may wait for the registry;
            after that the service counts as having no instance until the watch answers.
        on_departed: called when instances leave a service's passing set (so requests
            in flight to them can be retried at once rather than after their timeout).
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        tasks: TaskSupervisor,
        *,
        first_answer: float = 5.0,
        on_departed: Departed | None = None,
    ) -> None:
        self.registry = registry
        self.first_answer = first_answer
        self._tasks = tasks
        self._on_departed = on_departed
        self._entries: dict[str, _Entry] = {}

    async def instances(self, service: str) -> tuple[ServiceInstance, ...]:
        """The passing instances of `service` (sorted by id); () if none or no answer yet."""
        entry = self._entries.get(service)
        if entry is None:
            entry = self._entries[service] = _Entry()
            self._tasks.spawn(self._follow(service, entry), name=f"watch:{service}")
        if not entry.ready.is_set() and not await wait_event(entry.ready, self.first_answer):
            log.warning("registry gave no answer for %s within %.1f s", service, self.first_answer)
        return entry.instances

    def cached(self, service: str) -> tuple[ServiceInstance, ...] | None:
        """The instances of `service` without awaiting, once the first answer is in."""
        entry = self._entries.get(service)
        return entry.instances if entry is not None and entry.ready.is_set() else None

    def clear(self) -> None:
        """Forget every service (their watch tasks are cancelled by the task owner)."""
        self._entries.clear()

    async def _follow(self, service: str, entry: _Entry) -> None:
        """Follow `service`'s watch. A refusal (an ACL denial) is logged once, as an error,
        then retried quietly every few seconds: a policy granted later takes effect without a
        restart, and requests meanwhile go to the broker group unrouted."""
        failures = 0
        told = ""
        while True:
            try:
                watch = self.registry.watch(service)
            except ConfigurationError as exc:  # over max_watches: route it unrouted, loudly
                failures += 1
                if str(exc) != told:
                    told = str(exc)
                    log.error("cannot route to %s (sent to its broker group): %s", service, exc)
                entry.ready.set()  # callers stop waiting: no instance known, go unrouted
                if self.registry.closed:
                    return
                await asyncio.sleep(backoff_delay(failures + 1, cap=5.0))
                continue
            try:
                async for snapshot in watch:
                    failures, told = 0, ""
                    self._update(service, entry, snapshot.instances, snapshot.stale)
            except RegistryError as exc:
                failures += 1
                if str(exc) != told:
                    told = str(exc)
                    log.error("watch of %s failed (retried quietly): %s", service, exc)
            finally:
                await watch.aclose()
            if self.registry.closed:
                return
            await asyncio.sleep(backoff_delay(failures + 1, cap=5.0))

    def _update(
        self, service: str, entry: _Entry, found: tuple[ServiceInstance, ...], stale: bool
    ) -> None:
        before = {i.instance_id for i in entry.instances}
        entry.instances, entry.stale = found, stale
        entry.ready.set()
        gone = before - {i.instance_id for i in found}
        if gone and not stale and self._on_departed is not None:
            self._on_departed(service, frozenset(gone))
