"""The registry contract: `ServiceRegistry` (an ABC backends implement) and `Registration`.

The base class owns everything that is the same on every backend: heartbeat tasks (one per
registration, in a `TaskSupervisor`), re-registration when the backend forgot an instance,
the stale cache, watches (see `loom_ha.discovery.watch`) and the close sequence. A backend
only implements six small hooks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Self, TypeVar

from loom_ha._tasks import TaskSupervisor
from loom_ha.discovery.instance import Health, ServiceInstance, ServiceSnapshot, validate_name
from loom_ha.discovery.watch import Watch
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError
from loom_ha.retry import backoff_delay

__all__ = ["Registration", "RegistryStatistics", "ServiceRegistry"]

log = logging.getLogger("loom_ha.discovery")

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RegistryStatistics:
    """A snapshot of a registry's counters (read by tests, metrics and `loom-ha status`)."""

    backend: str
    endpoint: str
    registrations: int
    heartbeats: int
    heartbeat_failures: int
    reregistrations: int
    watches: int
    tasks: int
    closed: bool


class Registration:
    """One registered instance and its heartbeat; returned by `ServiceRegistry.register()`.

    The heartbeat runs every `interval` seconds (at most TTL/3) until `deregister()` or the
    registry's `close()`. It reports the health set with `set_health()`, and registers the
    instance again when the backend no longer knows it (Consul agent restart, Redis flush).
    """

    def __init__(
        self, registry: ServiceRegistry, instance: ServiceInstance, *, ttl: float, interval: float
    ) -> None:
        self.registry = registry
        self.instance = instance
        self.ttl = ttl
        self.interval = interval
        self.heartbeats = 0
        self.failures = 0
        self.reregistrations = 0
        self.last_heartbeat: float | None = None
        self.last_error: str | None = None
        self._health = Health.PASSING
        self._note = ""
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
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
        """The health this instance reports with each heartbeat."""
        return self._health

    def current(self) -> ServiceInstance:
        """The instance as the next heartbeat reports it (health, note, time)."""
        return self.instance.with_health(self._health, note=self._note, last_heartbeat=time.time())

    async def set_health(self, health: Health, note: str = "") -> None:
        """Report `health` (with a reason) now and with every later heartbeat.

        ``CRITICAL`` or ``WARNING`` takes the instance out of the passing set at once;
        ``PASSING`` brings it back. The heartbeat keeps the TTL alive either way.

        Raises:
            RegistryUnavailableError: the registry could not be told right now (the
                heartbeat keeps retrying with the new health).
        """
        self._health, self._note = health, note
        if self._active:
            await self.registry._beat(self)

    async def deregister(self) -> None:
        """Stop the heartbeat and remove the instance; idempotent."""
        await self.registry.deregister(self)

    def __repr__(self) -> str:
        service, instance_id = self.key
        return (
            f"<Registration {service}/{instance_id} {self._health.value} beats={self.heartbeats}>"
        )


class ServiceRegistry(ABC):
    """Where instances announce themselves and find each other.

    Contract (held by `loom_ha.testing.registry_conformance` for every backend):

    * `register()` makes an instance visible (passing) before it returns and keeps it so
      with a heartbeat at most every TTL/3; when heartbeats stop (crash), the instance
      leaves the passing set once its TTL expires.
    * `instances()` returns passing instances only unless asked otherwise; while the backend
      is unreachable it serves the last good answer (see `snapshot()` for the stale flag).
    * `watch()` yields a snapshot at once, then one per change; while the backend is
      unreachable it yields the last snapshot marked ``stale`` and keeps retrying with
      jittered backoff.
    * `close()` stops every heartbeat, deregisters every registration (unless told not to),
      ends every watch and leaves no task behind. Every method is safe to call concurrently.

    Implementing a backend: override `_put`, `_pulse`, `_remove`, `_query`, `_services` and
    `_close`; raise `RegistryUnavailableError` for anything transient.
    """

    backend: str = "registry"

    def __init__(
        self,
        *,
        ttl: float = 10.0,
        interval: float | None = None,
        timeout: float = 5.0,
        deregister_after: float = 60.0,
        watch_wait: float = 10.0,
        endpoint: str = "",
    ) -> None:
        """
        Args:
            ttl: default TTL of a registration, seconds.
            interval: heartbeat period; default TTL/3, and never more (consul #4742).
            timeout: bound on each non-blocking call to the backend, seconds.
            deregister_after: a critical instance is removed after this long (where the
                backend supports it; Consul's floor is 60 s).
            watch_wait: longest a watch blocks in one query (Consul's ``wait``).
            endpoint: shown in statistics and errors.
        """
        check_times(ttl=ttl, interval=interval)
        if timeout <= 0 or watch_wait <= 0 or deregister_after <= 0:
            raise ConfigurationError("timeout, watch_wait and deregister_after must be > 0")
        self.ttl = ttl
        self.interval = interval
        self.timeout = timeout
        self.deregister_after = deregister_after
        self.watch_wait = watch_wait
        self.endpoint = endpoint
        self._tasks = TaskSupervisor(f"loom_ha.discovery.{self.backend}")
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._last_good: dict[str, ServiceSnapshot] = {}
        self._watches: set[Watch] = set()
        self._closed = False
        self._closing = asyncio.Event()
        self._failures = self._reregistrations = self._heartbeats = 0

    # -- backend hooks -------------------------------------------------------------------------

    @abstractmethod
    async def _put(self, instance: ServiceInstance, ttl: float) -> None:
        """Create or replace `instance` (with its `health` and `note`) with a TTL."""

    @abstractmethod
    async def _pulse(self, instance: ServiceInstance, ttl: float) -> bool:
        """Refresh the TTL and report `instance.health`; False if the backend forgot it."""

    @abstractmethod
    async def _remove(self, instance: ServiceInstance) -> None:
        """Delete `instance`; deleting an unknown one is a no-op."""

    @abstractmethod
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]:
        """Every instance of `service` (any health) and the backend's index.

        With `index` 0 answer at once; otherwise block until the backend's index passes
        `index` or `wait` seconds pass (then answer anyway).
        """

    @abstractmethod
    async def _services(self) -> list[str]:
        """Names of the services that have at least one instance."""

    @abstractmethod
    async def _close(self) -> None:
        """Release clients and sockets; in-flight queries may fail."""

    # -- public API ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `close()` started."""
        return self._closed

    async def register(
        self, instance: ServiceInstance, *, ttl: float | None = None, interval: float | None = None
    ) -> Registration:
        """Register `instance` (passing) and keep it alive with a heartbeat.

        Args:
            instance: what to announce; its `health` is ignored (it starts passing).
            ttl: this registration's TTL (default: the registry's).
            interval: heartbeat period (default and maximum: TTL/3).

        Raises:
            RegistryError: the registry is closed, or this registry already registered
                the same (service, instance id).
            RegistryUnavailableError: the backend cannot be reached (nothing was started).
            ConfigurationError: bad ttl/interval.
        """
        self._check_open()
        ttl = self.ttl if ttl is None else ttl
        interval = self.interval if interval is None and ttl == self.ttl else interval
        check_times(ttl=ttl, interval=interval)
        key = (instance.service, instance.instance_id)
        if key in self._registrations:
            raise RegistryError(f"{key[0]}/{key[1]} is already registered by this registry")
        registration = Registration(self, instance, ttl=ttl, interval=interval or ttl / 3)
        self._registrations[key] = registration
        try:
            await self._call(self._put(registration.current(), ttl), self.timeout)
            await self._beat(registration)
        except BaseException:
            self._registrations.pop(key, None)
            registration._active = False
            raise
        self._tasks.spawn(self._heartbeat_loop(registration), name=f"heartbeat:{key[0]}/{key[1]}")
        return registration

    async def deregister(self, target: Registration | ServiceInstance) -> None:
        """Stop the heartbeat of `target` and remove it from the backend; idempotent.

        Raises:
            RegistryUnavailableError: the backend could not be told (the heartbeat is
                stopped anyway, so the instance goes critical when its TTL expires).
        """
        instance = target.instance if isinstance(target, Registration) else target
        registration = self._registrations.pop((instance.service, instance.instance_id), None)
        if registration is not None:
            registration._active = False
            registration._wake.set()
        await self._call(self._remove(instance), self.timeout)

    async def snapshot(self, service: str, *, passing_only: bool = True) -> ServiceSnapshot:
        """The instances of `service` now, or the last good answer marked stale.

        Raises:
            RegistryUnavailableError: unreachable and nothing cached for `service`.
        """
        self._check_open()
        validate_name(service, "service name")
        try:
            index, found = await self._call(self._query(service, 0, 0.0), self.timeout)
        except RegistryUnavailableError as exc:
            cached = self._last_good.get(service)
            if cached is None:
                raise
            stale = cached.as_stale(str(exc))
            return stale.passing() if passing_only else stale
        snap = self._remember(service, index, found)
        return snap.passing() if passing_only else snap

    async def instances(self, service: str, *, passing_only: bool = True) -> list[ServiceInstance]:
        """Instances of `service` (passing only by default), sorted by instance id.

        Serves the last good answer while the backend is unreachable.

        Raises:
            RegistryUnavailableError: unreachable and `service` was never read before.
        """
        return list((await self.snapshot(service, passing_only=passing_only)).instances)

    async def services(self) -> list[str]:
        """Sorted names of every service with at least one registered instance."""
        self._check_open()
        return sorted(await self._call(self._services(), self.timeout))

    def watch(self, service: str, *, passing_only: bool = True) -> Watch:
        """An async iterator of snapshots of `service`: the current one, then each change.

        Use ``async with registry.watch(s) as w: async for snap in w: ...``, or iterate it
        directly and call `aclose()`. It ends when the registry closes.
        """
        self._check_open()
        validate_name(service, "service name")
        return Watch(self, service, passing_only=passing_only)

    @property
    def registrations(self) -> list[Registration]:
        """Live registrations of this registry."""
        return list(self._registrations.values())

    def statistics(self) -> RegistryStatistics:
        """Counters and state."""
        return RegistryStatistics(
            backend=self.backend,
            endpoint=self.endpoint,
            registrations=len(self._registrations),
            heartbeats=self._heartbeats,
            heartbeat_failures=self._failures,
            reregistrations=self._reregistrations,
            watches=len(self._watches),
            tasks=self._tasks.running,
            closed=self._closed,
        )

    async def close(self, *, deregister: bool = True) -> None:
        """Stop heartbeats, deregister (unless `deregister` is False), end watches, close.

        Idempotent; finishes even when cancelled. With ``deregister=False`` the instances
        are left to expire, as if the process had crashed.
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        registrations = list(self._registrations.values())
        self._registrations.clear()
        for registration in registrations:
            registration._active = False
            registration._wake.set()
        try:
            await self._tasks.aclose()
            if deregister:
                for registration in registrations:
                    try:
                        await self._call(self._remove(registration.instance), self.timeout)
                    except RegistryError as exc:
                        log.warning("could not deregister %r on close: %s", registration, exc)
        finally:
            await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"{self.backend} registry is closed")

    async def _call(self, operation: Awaitable[T], limit: float) -> T:
        """Await a backend call with a deadline; a timeout is a transient failure."""
        try:
            async with asyncio.timeout(limit):
                return await operation
        except TimeoutError as exc:
            raise RegistryUnavailableError(
                f"{self.backend} at {self.endpoint} did not answer within {limit:.1f}s"
            ) from exc

    def _remember(self, service: str, index: int, found: list[ServiceInstance]) -> ServiceSnapshot:
        """Build a fresh snapshot of every instance and cache it for stale answers."""
        ordered = tuple(sorted(found, key=lambda i: i.instance_id))
        snap = ServiceSnapshot(service=service, instances=ordered, index=index)
        self._last_good[service] = snap
        return snap

    async def _beat(self, registration: Registration) -> None:
        """One heartbeat: report health, re-register if the backend forgot the instance."""
        async with registration._lock:
            if not registration._active:
                return
            timeout = min(self.timeout, registration.ttl)
            try:
                if not await self._call(
                    self._pulse(registration.current(), registration.ttl), timeout
                ):
                    log.warning(
                        "%r unknown to %s: registering it again", registration, self.backend
                    )
                    await self._call(self._put(registration.current(), registration.ttl), timeout)
                    registration.reregistrations += 1
                    self._reregistrations += 1
            except RegistryError as exc:
                registration.failures += 1
                registration.last_error = str(exc)
                self._failures += 1
                raise
            registration.heartbeats += 1
            self._heartbeats += 1
            registration.last_heartbeat = time.time()
            registration.last_error = None

    async def _heartbeat_loop(self, registration: Registration) -> None:
        # register() has just beaten: start with a pause. `_wake` is set only when the
        # registration ends, so the loop exits promptly even if a client library swallowed
        # the cancellation of an in-flight call.
        delay = registration.interval
        failures = 0
        while True:
            try:
                async with asyncio.timeout(delay):
                    await registration._wake.wait()
            except TimeoutError:
                pass
            if not registration._active:
                return
            delay = registration.interval
            try:
                await self._beat(registration)
                failures = 0
            except RegistryError as exc:
                # Retry sooner than the period, so one lost beat does not cost the TTL.
                failures += 1
                delay = backoff_delay(
                    failures, initial=registration.interval / 4, cap=registration.interval
                )
                log.warning(
                    "heartbeat of %r failed (%s); retrying in %.2fs", registration, exc, delay
                )

    async def _sleep_unless_closed(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if the registry starts closing."""
        try:
            async with asyncio.timeout(delay):
                await self._closing.wait()
        except TimeoutError:
            pass


def check_times(*, ttl: float, interval: float | None) -> None:
    """Validate a TTL and heartbeat interval (the interval must be at most TTL/3).

    Raises:
        ConfigurationError: naming the bad value.
    """
    if ttl <= 0:
        raise ConfigurationError(f"ttl must be > 0 seconds, got {ttl}")
    if interval is not None and not 0 < interval <= ttl / 3 + 1e-9:
        raise ConfigurationError(
            f"interval {interval} must be > 0 and at most ttl/3 = {ttl / 3:.3f}s: a pass "
            "arriving late makes a TTL check flap to critical (consul #4742)"
        )
