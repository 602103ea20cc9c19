"""The registry contract: `ServiceRegistry` (an ABC backends implement) and its statistics.

The base class owns everything that is the same on every backend: registrations and
their heartbeats (`loom_ha.discovery.heartbeat`: one loop and one backend round per TTL,
however many instances), the stale cache, watches (`loom_ha.discovery.watch`: one query
loop per watched service, shared by its watchers) and the close sequence. A backend
implements a few small hooks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Self, TypeVar

from loom_ha._tasks import TaskSupervisor, wait_event
from loom_ha.discovery.heartbeat import Heartbeat, fan_out
from loom_ha.discovery.instance import ServiceInstance, ServiceSnapshot, validate_name
from loom_ha.discovery.probe import HealthCheck
from loom_ha.discovery.registration import Registration
from loom_ha.discovery.watch import Watch, WatchHub
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError

__all__ = ["Registration", "RegistryStatistics", "ServiceRegistry"]

log = logging.getLogger("loom_ha.discovery")

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RegistryStatistics:
    """A snapshot of a registry's counters (read by tests, metrics and `loom-ha status`).

    `heartbeats` counts instance heartbeats the backend confirmed; `heartbeat_rounds` the
    backend calls that carried them (one per TTL group and interval, whatever the count of
    instances); `watched_services` the query loops shared by `watches`.
    """

    backend: str
    endpoint: str
    registrations: int
    heartbeats: int
    heartbeat_failures: int
    reregistrations: int
    watches: int
    tasks: int
    closed: bool
    heartbeat_rounds: int = 0
    watched_services: int = 0
    watch_failures: int = 0  # watch queries that got no answer (each logged once per outage)


class ServiceRegistry(ABC):
    """Where instances announce themselves and find each other.

    Contract (held by `loom_ha.testing.registry_conformance` for every backend):

    * `register()` makes an instance visible (passing) before it returns and keeps it so
      with a heartbeat at most every TTL/3; when heartbeats stop (crash), the instance
      leaves the passing set once its TTL expires. A registration with a liveness probe
      that stops answering is reported critical while its siblings stay passing.
    * `instances()` returns passing instances only unless asked otherwise; while the backend
      is unreachable it serves the last good answer (see `snapshot()` for the stale flag).
    * `watch()` yields a snapshot at once, then one per change; while the backend is
      unreachable it yields the last snapshot marked ``stale`` and keeps retrying with
      jittered backoff.
    * `close()` stops every heartbeat, deregisters every registration (unless told not to),
      ends every watch and leaves no task behind. Every method is safe to call concurrently.

    Implementing a backend: override `_put`, `_pulse`, `_remove`, `_query`, `_services` and
    `_close` (and `_pulse_all` / `_remove_all` to batch); `_errors` turns the client's
    errors into `RegistryUnavailableError` for anything transient.
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
        probe_timeout: float | None = None,
        max_watches: int | None = None,
        concurrency: int | None = None,
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
            probe_timeout: how long a liveness probe may take before its instance counts
                as hung; default a quarter of the heartbeat interval, at most half of it.
            max_watches: most services watched at once (each holds one query loop).
            concurrency: most backend calls in flight at once (None: no limit); more wait.
            endpoint: shown in statistics and errors.
        """
        check_times(ttl=ttl, interval=interval)
        if timeout <= 0 or watch_wait <= 0 or deregister_after <= 0:
            raise ConfigurationError("timeout, watch_wait and deregister_after must be > 0")
        if probe_timeout is not None and probe_timeout <= 0:
            raise ConfigurationError(f"probe_timeout must be > 0 seconds, got {probe_timeout}")
        if max_watches is not None and max_watches < 1:
            raise ConfigurationError(f"max_watches must be >= 1, got {max_watches}")
        self.ttl = ttl
        self.interval = interval
        self.timeout = timeout
        self.deregister_after = deregister_after
        self.watch_wait = watch_wait
        self.probe_timeout = probe_timeout
        self.endpoint = endpoint
        self._tasks = TaskSupervisor(f"loom_ha.discovery.{self.backend}")
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._heartbeats: dict[tuple[float, float], Heartbeat] = {}
        self._last_good: dict[str, ServiceSnapshot] = {}
        self._hub = WatchHub(self, self._tasks, limit=max_watches)
        self._slots = asyncio.Semaphore(concurrency) if concurrency is not None else None
        self._closed = False
        self._closing = asyncio.Event()

    # -- backend hooks -------------------------------------------------------------------------

    @abstractmethod
    async def _put(self, instance: ServiceInstance, ttl: float) -> None:
        """Create or replace `instance` (with its `health` and `note`) with a TTL."""

    @abstractmethod
    async def _pulse(self, instance: ServiceInstance, ttl: float) -> bool:
        """Report `instance.health` now (and refresh its TTL); False if the backend forgot it."""

    async def _pulse_all(
        self,
        instances: Sequence[ServiceInstance],
        changed: Sequence[ServiceInstance],
        ttl: float,
    ) -> list[ServiceInstance]:
        """One heartbeat round for every instance sharing `ttl`; return those the backend forgot.

        Keeps every one of `instances` alive and reports the health of `changed` (those
        whose health or note differs from what the backend was last told). Backends batch
        here (a pipeline, one process-level check); this default pulses each in turn.
        """
        return [i for i in instances if not await self._pulse(i, ttl)]

    @abstractmethod
    async def _remove(self, instance: ServiceInstance) -> None:
        """Delete `instance`; deleting an unknown one is a no-op."""

    async def _remove_all(self, instances: Sequence[ServiceInstance]) -> None:
        """`close()` with deregistration: delete `instances` and whatever else this registry
        keeps at the backend for its heartbeats.

        Raises:
            RegistryError: some could not be deleted (the first error; all were tried).
        """
        failed = await fan_out(instances, lambda i: self._call(self._remove(i), self.timeout))
        if failed:
            raise failed[0][1]

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

    def _errors(self) -> AbstractContextManager[None]:
        """Translates the client's errors inside every backend call (see `_call`)."""
        return nullcontext()

    # -- public API ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `close()` started."""
        return self._closed

    async def register(
        self,
        instance: ServiceInstance,
        *,
        ttl: float | None = None,
        interval: float | None = None,
        probe: HealthCheck | None = None,
    ) -> Registration:
        """Register `instance` (passing) and keep it alive with the registry's heartbeat.

        Registrations sharing a TTL share one heartbeat: one loop and one backend round per
        interval for all of them.

        Args:
            instance: what to announce; its `health` is ignored (it starts passing).
            ttl: this registration's TTL (default: the registry's).
            interval: heartbeat period (default and maximum: TTL/3).
            probe: liveness probe, asked before every heartbeat round; an instance whose
                probe fails or takes longer than the probe timeout is reported critical
                (with the reason) until it answers again. Its handlers stuck means hung.

        Raises:
            RegistryError: the registry is closed, or this registry already registered
                the same (service, instance id).
            RegistryUnavailableError: the backend cannot be reached (nothing was started).
            ConfigurationError: bad ttl/interval/probe timeout.
        """
        self._check_open()
        ttl = self.ttl if ttl is None else ttl
        interval = self.interval if interval is None and ttl == self.ttl else interval
        check_times(ttl=ttl, interval=interval)
        interval = interval or ttl / 3
        limit = self.probe_timeout
        if probe is not None and limit is not None and limit > interval / 2 + 1e-9:
            raise ConfigurationError(
                f"probe_timeout {self.probe_timeout}s must be at most half the heartbeat "
                f"interval ({interval / 2:.3f}s): a hung probe delays the round's beat"
            )
        key = (instance.service, instance.instance_id)
        if key in self._registrations:
            raise RegistryError(f"{key[0]}/{key[1]} is already registered by this registry")
        registration = Registration(self, instance, ttl=ttl, interval=interval, probe=probe)
        self._registrations[key] = registration
        try:
            await self._heartbeat(ttl, interval).join(registration)
        except BaseException:
            if self._registrations.get(key) is registration:
                del self._registrations[key]
            registration._active = False
            raise
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
            heartbeat = self._heartbeats.get((registration.ttl, registration.interval))
            if heartbeat is not None:
                heartbeat.leave(registration)
                await heartbeat.settle()  # a round in flight must not bring it back
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
        directly and call `aclose()`. It ends when the registry closes. Every watch of one
        service in this registry shares one query loop (one blocking query on Consul).

        Raises:
            ConfigurationError: a new service would pass `max_watches`.
        """
        self._check_open()
        validate_name(service, "service name")
        return self._hub.watch(service, passing_only=passing_only)

    @property
    def registrations(self) -> list[Registration]:
        """Live registrations of this registry."""
        return list(self._registrations.values())

    def statistics(self) -> RegistryStatistics:
        """Counters and state."""
        beats = self._heartbeats.values()
        return RegistryStatistics(
            backend=self.backend,
            endpoint=self.endpoint,
            registrations=len(self._registrations),
            heartbeats=sum(h.beats for h in beats),
            heartbeat_failures=sum(h.failures for h in beats),
            reregistrations=sum(h.reregistrations for h in beats),
            watches=self._hub.watches,
            tasks=self._tasks.running,
            closed=self._closed,
            heartbeat_rounds=sum(h.rounds for h in beats),
            watched_services=len(self._hub.feeds),
            watch_failures=self._hub.failed_queries,
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
        try:
            await self._tasks.aclose()
            if deregister:
                try:
                    await self._remove_all([r.instance for r in registrations])
                except RegistryError as exc:
                    log.warning("could not deregister every instance on close: %s", exc)
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

    def _heartbeat(self, ttl: float, interval: float) -> Heartbeat:
        """The heartbeat of registrations with this (ttl, interval), started when first asked."""
        heartbeat = self._heartbeats.get((ttl, interval))
        if heartbeat is None:
            probe_timeout = self.probe_timeout if self.probe_timeout is not None else interval / 4
            heartbeat = Heartbeat(self, ttl=ttl, interval=interval, probe_timeout=probe_timeout)
            self._heartbeats[ttl, interval] = heartbeat
            self._tasks.spawn(heartbeat.run(), name=f"heartbeat:ttl={ttl:g}s")
        return heartbeat

    async def _report(self, registration: Registration) -> None:
        """Tell the backend `registration`'s health now (`Registration.set_health`)."""
        heartbeat = self._heartbeats.get((registration.ttl, registration.interval))
        if heartbeat is not None:
            await heartbeat.report(registration)

    async def _call(self, operation: Awaitable[T], limit: float, *, queued: bool = True) -> T:
        """Await a backend call with a deadline; a timeout is a transient failure.

        A `queued` call first waits for one of the registry's `concurrency` slots, and its
        deadline starts once it has one: a thousand registrations started at once wait
        their turn instead of timing out in the client's queue. Heartbeat rounds and watch
        queries are not queued (they must not wait behind a registration storm). Never
        nest queued calls.
        """
        slots = self._slots if queued else None
        try:
            if slots is not None:
                await slots.acquire()
        except BaseException:
            if inspect.iscoroutine(operation):
                operation.close()  # never started: no "never awaited" warning
            raise
        try:
            async with asyncio.timeout(limit):
                with self._errors():
                    return await operation
        except TimeoutError as exc:
            raise RegistryUnavailableError(
                f"{self.backend} at {self.endpoint} did not answer within {limit:.1f}s"
            ) from exc
        finally:
            if slots is not None:
                slots.release()

    def _remember(self, service: str, index: int, found: list[ServiceInstance]) -> ServiceSnapshot:
        """Build a fresh snapshot of every instance and cache it for stale answers."""
        ordered = tuple(sorted(found, key=lambda i: i.instance_id))
        snap = ServiceSnapshot(service=service, instances=ordered, index=index)
        self._last_good[service] = snap
        return snap

    async def _sleep_unless_closed(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if the registry starts closing."""
        await wait_event(self._closing, delay)


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
