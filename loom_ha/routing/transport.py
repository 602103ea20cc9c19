"""`BalancedTransport`: requests go to one chosen instance; failed attempts go to another.

Serving side: a subscription to a request topic (``node.request/X``, the default group
rule's topics) registers this process as an instance of service ``X`` and listens on two
topics: the broker group every instance shares (so clients without a registry still
reach one instance), and this instance's own inbox (``node.request/X@<instance id>``).
A dedup window in front of the handler drops a request this service already handled
or is handling (retries reuse the event id).

Calling side: a request is published to the inbox of the instance the balancer picks
among the passing instances the registry lists. The reply (``node.response/X`` or
``node.error/X``, paired by ``data["request_id"]``) feeds the balancer its latency and
outcome. No reply within `attempt_timeout`, a failed send, or the instance leaving the
registry means another attempt on another instance, until the budget (attempts and
total time, a `RetryPolicy`) is spent. Instances that keep failing are ejected for a
while (`Ejector`), long before the registry's TTL notices a crash.

Without a registry (or with no instance registered) requests go to the broker group.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from typing_extensions import override

from loom_ha._handlers import Handler
from loom_ha._tasks import TaskSupervisor
from loom_ha.balancing import Balancer, Ejector, PowerOfTwoEWMA
from loom_ha.discovery.base import Registration, ServiceRegistry
from loom_ha.discovery.instance import Health, ServiceInstance, validate_name
from loom_ha.errors import (
    ConfigurationError,
    RegistryError,
    RegistryUnavailableError,
)
from loom_ha.ha.dedup import DedupHandler, DedupWindow, MemoryDedup
from loom_ha.retry import ROUTED_BUDGET, RetryPolicy, backoff_delay
from loom_ha.routing.directory import InstanceDirectory
from loom_ha.routing.requests import RequestRouter
from loom_ha.routing.routes import LOOM_ROUTES, RequestRoutes, service_name
from loom_ha.transport import StateListener, Transport, TransportState, TransportStatistics

__all__ = [
    "DEFAULT_ATTEMPT_TIMEOUT",
    "DEFAULT_BUDGET",
    "BalancedTransport",
    "default_balancer",
    "default_instance_id",
]

log = logging.getLogger("loom_ha.routing")

DEFAULT_ATTEMPT_TIMEOUT = 10.0
"""Seconds a request waits for a reply before another instance gets it."""

DEFAULT_BUDGET = ROUTED_BUDGET
"""Three attempts within Loom's 30 s request timeout."""


def default_balancer() -> Balancer:
    """Power of two choices on EWMA latency, ejecting after 3 failures in a row."""
    return Ejector(PowerOfTwoEWMA(), consecutive_failures=3, base_ejection=10.0)


def default_instance_id() -> str:
    """``$LOOM_HA_INSTANCE_ID``, else ``<hostname>-<pid>`` (registry-safe)."""
    return os.environ.get("LOOM_HA_INSTANCE_ID") or service_name(
        f"{socket.gethostname()}-{os.getpid()}"
    )


class BalancedTransport(Transport):
    """Instance-aware request routing over any transport; see the module docstring.

    Args:
        inner: the transport that moves the events (often an `HATransport`).
        registry: where instances register and are found; None: broker groups only.
        balancer: picks an instance per attempt (default: P2C-EWMA with ejection).
        instance_id: this process's id in the registry (default: `default_instance_id`).
        attempt_timeout: seconds to wait for a reply before trying another instance;
            set it above your slowest handler (a slow instance is not a dead one).
        budget: attempts and total seconds per request (`RetryPolicy.attempts` /
            `.timeout`); the same policy type the HA layer retries with.
        dedup: the serving side's window (True: in-process; pass a `RedisDedup` so that
            a retried request is not handled again by another instance).
        routes: the request/reply convention (Loom's by default).
        ttl: TTL of this process's registrations (default: the registry's).
        weight: this instance's relative share for weighted strategies.
    """

    def __init__(
        self,
        inner: Transport,
        registry: ServiceRegistry | None = None,
        *,
        balancer: Balancer | None = None,
        instance_id: str | None = None,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        budget: RetryPolicy = DEFAULT_BUDGET,
        dedup: DedupWindow | bool | None = True,
        routes: RequestRoutes = LOOM_ROUTES,
        ttl: float | None = None,
        weight: int = 1,
    ) -> None:
        if not attempt_timeout > 0:
            raise ConfigurationError(f"attempt_timeout must be > 0, got {attempt_timeout!r}")
        self.inner = inner
        self.capabilities = inner.capabilities
        self.registry = registry
        self.balancer = balancer if balancer is not None else default_balancer()
        self.instance_id = validate_name(instance_id or default_instance_id(), "instance id")
        self.attempt_timeout = attempt_timeout
        self.attempts = budget.attempts or 1
        self.budget_seconds = budget.timeout
        self.routes = routes
        self.ttl = ttl
        self.weight = weight
        self._dedup: DedupWindow | None = MemoryDedup() if dedup is True else (dedup or None)
        self._tasks = TaskSupervisor("loom_ha.routing")
        self._directory: InstanceDirectory | None = None
        self._requests: RequestRouter | None = None  # the calling side, with a registry
        if registry is not None:
            self._directory = InstanceDirectory(registry, self._tasks, on_departed=self._departed)
            self._requests = RequestRouter(
                inner,
                self._directory,
                self.balancer,
                routes,
                self._tasks,
                attempt_timeout=attempt_timeout,
                attempts=budget.attempts or 1,
                budget_seconds=budget.timeout,
            )
        self._served: dict[tuple[str, Handler], Handler] = {}
        self._registrations: dict[str, Registration] = {}
        self._registering: set[str] = set()  # registrations retried in the background
        self._unwatch_state: Callable[[], None] | None = None
        self._lock = asyncio.Lock()
        self.duplicates_dropped = 0

    # -- lifecycle -------------------------------------------------------------------------

    @override
    async def connect(self) -> None:
        await self.inner.connect()
        self._tasks.reopen()
        if self._unwatch_state is None:
            self._unwatch_state = self.inner.add_state_listener(self._inner_state_changed)

    @override
    def add_state_listener(self, listener: StateListener) -> Callable[[], None] | None:
        """The inner transport's state is this one's: its listeners are told."""
        return self.inner.add_state_listener(listener)

    def _inner_state_changed(self, state: TransportState) -> None:
        """While the broker is away this instance cannot receive: take it out of rotation."""
        if not self._registrations or state not in (
            TransportState.RECONNECTING,
            TransportState.CONNECTED,
        ):
            return
        health = Health.PASSING if state is TransportState.CONNECTED else Health.CRITICAL
        note = "" if health is Health.PASSING else "lost the broker connection, reconnecting"
        with contextlib.suppress(RuntimeError):  # closing: the registrations go anyway
            self._tasks.spawn(self._report_health(health, note), name=f"health:{health.value}")

    async def _report_health(self, health: Health, note: str) -> None:
        for registration in list(self._registrations.values()):
            try:
                await registration.set_health(health, note)
            except RegistryError as exc:  # the heartbeat keeps reporting the new health
                log.warning("registry not told of %s yet: %s", health.value, exc)

    @override
    async def disconnect(self) -> None:
        """Deregister (so callers stop choosing this process), stop watches, disconnect."""
        try:
            for registration in list(self._registrations.values()):
                try:
                    await registration.deregister()
                except RegistryError as exc:  # its TTL will expire it
                    log.warning("could not deregister %s: %s", registration, exc)
        finally:
            if self._unwatch_state is not None:
                self._unwatch_state()
                self._unwatch_state = None
            self._registrations.clear()
            await self._tasks.aclose()
            if self._directory is not None:
                self._directory.clear()
            if self._requests is not None:
                self._requests.clear()
            self._served.clear()
            await self.inner.disconnect()

    @override
    async def close(self) -> None:
        """Disconnect, then close the inner transport, the registry and the dedup window."""
        try:
            await self.disconnect()
            await self.inner.close()
        finally:
            if self.registry is not None:
                await self.registry.close()
            if self._dedup is not None:
                await self._dedup.close()

    @override
    async def __aexit__(self, *exc_info: object) -> None:
        """Leaving ``async with`` closes: the registry and dedup window are ours to close."""
        await self.close()

    # -- serving side ----------------------------------------------------------------------

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        path = self.routes.target(topic)
        if self.registry is None or path is None or group is not None:
            await self.inner.subscribe(topic, handler, group=group)
            return
        async with self._lock:
            served = self._served.get((topic, handler))
            if served is None:
                served = handler
                if self._dedup is not None:
                    served = DedupHandler(handler, self._dedup, f"req:{topic}", self._duplicate)
                self._served[topic, handler] = served
            inbox = self.routes.inbox(topic, self.instance_id)
            await self.inner.subscribe(topic, served)  # the broker group, for any caller
            await self.inner.subscribe(inbox, served)
            if topic not in self._registrations and topic not in self._registering:
                instance = ServiceInstance(
                    service=self.routes.service(path),
                    instance_id=self.instance_id,
                    address=socket.gethostname(),
                    weight=self.weight,
                    meta={"topic": topic, "inbox": inbox, "pid": str(os.getpid())},
                )
                try:
                    self._registrations[topic] = await self.registry.register(
                        instance, ttl=self.ttl
                    )
                except RegistryUnavailableError as exc:
                    # Serve through the broker group meanwhile; register when it answers.
                    log.warning("registry unreachable (%s): registering %s later", exc, topic)
                    self._registering.add(topic)
                    self._tasks.spawn(
                        self._register_later(topic, instance), name=f"register:{topic}"
                    )

    async def _register_later(self, topic: str, instance: ServiceInstance) -> None:
        """Retry a registration until the registry answers (or the subscription ends)."""
        assert self.registry is not None
        attempt = 0
        try:
            while any(t == topic for t, _ in self._served):
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, cap=5.0))
                try:
                    registration = await self.registry.register(instance, ttl=self.ttl)
                except RegistryUnavailableError:
                    continue
                self._registrations[topic] = registration
                log.info("registered %s after %d attempt(s)", topic, attempt + 1)
                return
        finally:
            self._registering.discard(topic)

    def _duplicate(self) -> None:
        self.duplicates_dropped += 1

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        async with self._lock:
            served = self._served.pop((topic, handler), None)
            if served is None:
                await self.inner.unsubscribe(topic, handler)
                return
            if not any(t == topic for t, _ in self._served):
                registration = self._registrations.pop(topic, None)
                if registration is not None:
                    await registration.deregister()
            await self.inner.unsubscribe(topic, served)
            await self.inner.unsubscribe(self.routes.inbox(topic, self.instance_id), served)

    # -- calling side ----------------------------------------------------------------------

    @override
    async def publish(self, topic: str, event: Any) -> None:
        path = self.routes.target(topic) if self._requests is not None else None
        if path is None or self._requests is None:
            await self.inner.publish(topic, event)
            return
        await self._requests.publish(topic, path, event)

    def _departed(self, service: str, gone: frozenset[str]) -> None:
        """Instances left the registry: their attempts in flight fail now, not at timeout."""
        if self._requests is not None:
            self._requests.departed(service, gone)

    # -- introspection ---------------------------------------------------------------------

    @override
    async def ping(self) -> None:
        await self.inner.ping()

    @override
    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        return self.inner.resolve_group(pattern, group)

    @override
    def statistics(self) -> TransportStatistics:
        stats = self.inner.statistics()
        extra = dict(stats.extra or {})
        extra["instance_id"] = self.instance_id
        requests = self._requests
        extra.update(requests.statistics() if requests is not None else RequestRouter.NONE_SENT)
        extra["registered"] = sorted(self._registrations)
        if isinstance(self.balancer, Ejector):
            extra["ejected"] = list(self.balancer.statistics().ejected)
        return dataclasses.replace(
            stats,
            duplicates_dropped=stats.duplicates_dropped + self.duplicates_dropped,
            extra=extra,
        )
