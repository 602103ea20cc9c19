"""`Registration`: one registered instance, what it reports, and what its registry was told.

The heartbeat itself is not here: every registration of a registry that shares a TTL is
kept alive by one `loom_ha.discovery.heartbeat.Heartbeat` (one loop, one backend round per
interval), so heartbeats cost per process, not per instance.
"""

from __future__ import annotations

import time
from typing import Protocol

from loom_ha.discovery.instance import Health, ServiceInstance
from loom_ha.discovery.probe import HealthCheck

__all__ = ["Registration", "RegistrationHost"]


class RegistrationHost(Protocol):
    """What a `Registration` needs of its registry (`ServiceRegistry` provides it)."""

    async def deregister(self, target: Registration | ServiceInstance) -> None: ...
    async def _report(self, registration: Registration) -> None: ...


class Registration:
    """One registered instance; returned by `ServiceRegistry.register()`.

    Its registry's heartbeat keeps it alive every `interval` seconds (at most TTL/3) until
    `deregister()` or the registry's `close()`, reporting the health set with
    `set_health()`. With a liveness `probe`, each heartbeat round asks it first: a probe
    that fails or does not answer within the registry's probe timeout reports this
    instance critical (its siblings in the same process stay passing) until it answers
    again. When the backend no longer knows the instance (Consul agent restart, Redis
    flush) the heartbeat registers it again.
    """

    def __init__(
        self,
        registry: RegistrationHost,
        instance: ServiceInstance,
        *,
        ttl: float,
        interval: float,
        probe: HealthCheck | None = None,
    ) -> None:
        self.registry = registry
        self.instance = instance
        self.ttl = ttl
        self.interval = interval
        self.probe = probe
        self.heartbeats = 0
        self.failures = 0
        self.reregistrations = 0
        self.last_heartbeat: float | None = None
        self.last_error: str | None = None
        self._health = Health.PASSING
        self._note = ""
        # Why the liveness probe failed in the last round (None: it answered yes).
        self._verdict: str | None = None
        # (health, note) the backend last confirmed; a round reports only what differs.
        self._reported: tuple[Health, str] | None = None
        self._active = True

    @property
    def key(self) -> tuple[str, str]:
        """(service, instance id)."""
        return self.instance.service, self.instance.instance_id

    @property
    def active(self) -> bool:
        """True until deregistered (or the registry closed)."""
        return self._active

    @property
    def health(self) -> Health:
        """The health the next heartbeat reports: critical while the probe fails."""
        return self.state()[0]

    @property
    def note(self) -> str:
        """Why the health is what it is ("" when passing without a reason)."""
        return self.state()[1]

    def state(self) -> tuple[Health, str]:
        """(health, note) as reported: the probe's verdict wins over `set_health()`."""
        if self._verdict is not None:
            return Health.CRITICAL, self._verdict
        return self._health, self._note

    def current(self, now: float | None = None) -> ServiceInstance:
        """The instance as the next heartbeat reports it (health, note, time)."""
        health, note = self.state()
        when = time.time() if now is None else now
        return self.instance.with_health(health, note=note, last_heartbeat=when)

    async def set_health(self, health: Health, note: str = "") -> None:
        """Report `health` (with a reason) now and with every later heartbeat.

        ``CRITICAL`` or ``WARNING`` takes the instance out of the passing set at once;
        ``PASSING`` brings it back (unless its liveness probe fails). The heartbeat keeps
        the instance alive either way.

        Raises:
            RegistryUnavailableError: the registry could not be told right now (the
                heartbeat keeps retrying with the new health).
        """
        self._health, self._note = health, note
        if self._active:
            await self.registry._report(self)

    async def deregister(self) -> None:
        """Stop the heartbeat and remove the instance; idempotent."""
        await self.registry.deregister(self)

    def _confirmed(self, sent: ServiceInstance, *, reported: bool = True) -> None:
        """The backend accepted `sent` (a heartbeat, a report or a registration); with
        `reported` False it kept the instance alive but was not told its health yet."""
        self.heartbeats += 1
        self.last_heartbeat = sent.last_heartbeat
        self.last_error = None
        if reported:
            self._reported = (sent.health, sent.note)

    def _failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error

    def __repr__(self) -> str:
        service, instance_id = self.key
        return f"<Registration {service}/{instance_id} {self.health.value} beats={self.heartbeats}>"
