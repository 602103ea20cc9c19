"""HealthGate: health-gated consumption around any loom-ha Transport.

While the instance is unhealthy (its check callable says so, or someone calls `report()`),
its registry check goes critical (it leaves the passing set) and its subscriptions are
withdrawn from the broker; when healthy again they are restored, then it rejoins the set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from typing_extensions import override

from loom_ha._handlers import Handler
from loom_ha._tasks import TaskSupervisor
from loom_ha.discovery.instance import Health
from loom_ha.discovery.probe import HealthCheck, evaluate
from loom_ha.discovery.registration import Registration
from loom_ha.errors import ConfigurationError, RegistryError
from loom_ha.transport import StateListener, Transport, TransportStatistics

__all__ = ["HealthCheck", "HealthGate"]

log = logging.getLogger("loom_ha.discovery.health")


class HealthGate(Transport):
    """A transport that stops consuming while its instance is unhealthy.

    Why unsubscribe rather than drop deliveries: with competing consumers (Loom's
    ``node.request/<node>`` groups) a member that drops what it receives loses requests the
    broker gave it; a member that leaves the group lets the broker hand them to a healthy
    instance. Publishing is never gated (in-flight replies still go out).

    Order of a transition: going unhealthy, the registry check goes critical first (callers
    stop choosing this instance), then the subscriptions are withdrawn; going healthy, the
    subscriptions are restored first, then the check passes again.

    Args:
        transport: the transport to wrap (connected and disconnected through the gate).
        registration: the instance's registration; None to gate consumption only.
        check: polled every `interval` seconds while connected; an exception or a
            result not ready within `interval` counts as unhealthy.
        interval: seconds between checks.
    """

    def __init__(
        self,
        transport: Transport,
        registration: Registration | None = None,
        *,
        check: HealthCheck | None = None,
        interval: float = 1.0,
    ) -> None:
        if interval <= 0:
            raise ConfigurationError(f"interval must be > 0, got {interval}")
        self.inner = transport
        # Same guarantees as the wrapped transport: the gate only adds pauses.
        self.capabilities = transport.capabilities
        self.registration = registration
        self.check = check
        self.interval = interval
        self.transitions = 0
        self._health = Health.PASSING
        self._note = ""
        self._subscriptions: dict[tuple[str, Handler], str | None] = {}
        self._lock = asyncio.Lock()
        self._tasks = TaskSupervisor("loom_ha.discovery.health")
        self._checking = False

    @property
    def health(self) -> Health:
        """Current health of the gate."""
        return self._health

    @property
    def healthy(self) -> bool:
        """True while subscriptions are live."""
        return self._health is Health.PASSING

    async def report(self, health: Health | bool, note: str = "") -> None:
        """Set the health now (a failing dependency can push it instead of being polled).

        Idempotent: reporting the current health again changes nothing.
        """
        if isinstance(health, bool):
            health = Health.PASSING if health else Health.CRITICAL
        async with self._lock:
            if health is self._health:
                return
            self.transitions += 1
            self._health, self._note = health, note
            if health is Health.PASSING:
                for (topic, handler), group in list(self._subscriptions.items()):
                    await self.inner.subscribe(topic, handler, group=group)
                await self._tell_registry(health, note)
            else:
                await self._tell_registry(health, note)
                for topic, handler in list(self._subscriptions):
                    await self.inner.unsubscribe(topic, handler)
            log.info("health gate: %s (%s)", health.value, note or "no reason given")

    async def _tell_registry(self, health: Health, note: str) -> None:
        if self.registration is None or not self.registration.active:
            return
        try:
            await self.registration.set_health(health, note)
        except RegistryError as exc:
            # The heartbeat keeps reporting the new health; consumption is gated already.
            log.warning("registry not told of %s yet: %s", health.value, exc)

    async def _check_loop(self) -> None:
        check = self.check
        assert check is not None
        while True:
            ok, note = await evaluate(check, self.interval, what="health check")
            await self.report(ok, note)
            await asyncio.sleep(self.interval)

    @override
    async def connect(self) -> None:
        await self.inner.connect()
        if self.check is not None and not self._checking:
            self._checking = True
            self._tasks.reopen()
            self._tasks.spawn(self._check_loop(), name="health-check")

    @override
    async def disconnect(self) -> None:
        self._checking = False
        try:
            await self._tasks.aclose()
        finally:
            self._subscriptions.clear()
            await self.inner.disconnect()

    @override
    async def publish(self, topic: str, event: Any) -> None:
        await self.inner.publish(topic, event)

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        async with self._lock:
            if self.healthy:
                await self.inner.subscribe(topic, handler, group=group)
            self._subscriptions[topic, handler] = group

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        async with self._lock:
            if self._subscriptions.pop((topic, handler), _MISSING) is not _MISSING and self.healthy:
                await self.inner.unsubscribe(topic, handler)

    @override
    def add_state_listener(self, listener: StateListener) -> Callable[[], None] | None:
        return self.inner.add_state_listener(listener)  # its state is the inner one's

    @override
    def statistics(self) -> TransportStatistics:
        stats = self.inner.statistics()
        extra = dict(stats.extra or {})
        extra.update(
            health=self._health.value,
            health_note=self._note,
            health_transitions=self.transitions,
            paused_subscriptions=0 if self.healthy else len(self._subscriptions),
        )
        return dataclasses.replace(stats, extra=extra)


_MISSING: Any = object()
