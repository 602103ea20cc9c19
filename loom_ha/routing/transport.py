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
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    TransientError,
)
from loom_ha.ha.dedup import DedupHandler, DedupWindow, MemoryDedup
from loom_ha.retry import ROUTED_BUDGET, RetryPolicy, backoff_delay
from loom_ha.routing.directory import InstanceDirectory
from loom_ha.routing.routes import LOOM_ROUTES, RequestRoutes, service_name
from loom_ha.tracing import activated, capture, end_span, start_attempt
from loom_ha.transport import Transport, TransportState, TransportStatistics

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


@dataclass(eq=False)
class _Request:
    """One request in flight from this process."""

    topic: str
    event: Any
    service: str
    expires: float  # end of the whole budget (monotonic)
    attempt: int = 0
    instance: ServiceInstance | None = None
    sent_at: float = 0.0
    tried: list[str] = field(default_factory=list)
    trace: Any = None  # the caller's trace context (loom_ha.tracing), for later attempts
    span: Any = None  # the current attempt's span


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
        self._directory = (
            InstanceDirectory(registry, self._tasks, on_departed=self._departed)
            if registry is not None
            else None
        )
        self._served: dict[tuple[str, Handler], Handler] = {}
        self._registrations: dict[str, Registration] = {}
        self._registering: set[str] = set()  # registrations retried in the background
        self._unwatch_state: Callable[[], None] | None = None
        self._listening: set[str] = set()  # request topics whose replies we follow
        self._pending: dict[str, _Request] = {}
        # Per request topic: (the directory's snapshot, its instances serving the topic).
        self._serving_of: dict[
            str, tuple[tuple[ServiceInstance, ...], tuple[ServiceInstance, ...]]
        ] = {}
        self._deadlines: deque[tuple[float, _Request, int]] = deque()
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.routed = self.unrouted = self.retries = self.timeouts = 0
        self.replies = self.abandoned = self.duplicates_dropped = 0

    # -- lifecycle -------------------------------------------------------------------------

    @override
    async def connect(self) -> None:
        await self.inner.connect()
        self._tasks.reopen()
        watch = getattr(self.inner, "add_state_listener", None)  # HATransport has one
        if watch is not None and self._unwatch_state is None:
            self._unwatch_state = watch(self._inner_state_changed)

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
            self._timer = None
            if self._directory is not None:
                self._directory.clear()
            self._served.clear()
            self._listening.clear()
            for request in self._pending.values():
                end_span(request.span, "disconnected before a reply")
            self._pending.clear()
            self._deadlines.clear()
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
        path = self.routes.target(topic) if self._directory is not None else None
        if path is None or self._directory is None:
            await self.inner.publish(topic, event)
            return
        service = self.routes.service(path)
        known = self._directory.cached(service)
        if known is None:
            known = await self._directory.instances(service)
        instances = self._serving(topic, known)
        if not instances:
            self.unrouted += 1
            await self.inner.publish(topic, event)
            return
        if topic not in self._listening:
            await self._follow_replies(topic)
        now = time.monotonic()
        budget = self.budget_seconds
        request = _Request(
            topic,
            event,
            service,
            expires=now + budget if budget is not None else float("inf"),
            trace=capture(),  # None unless a tracer provider is configured
        )
        self._pending[str(event.id)] = request
        self.routed += 1
        try:
            await self._send(request, instances)
        except BaseException:
            self._pending.pop(str(event.id), None)
            raise

    async def _follow_replies(self, topic: str) -> None:
        async with self._lock:
            if topic in self._listening:
                return
            for reply_topic in self.routes.replies(topic):
                await self.inner.subscribe(reply_topic, self._on_reply)
            self._listening.add(topic)
        if self._timer is None or self._timer.done():
            self._timer = self._tasks.spawn(self._expire_attempts(), name="attempt-timer")

    def _serving(
        self, topic: str, known: tuple[ServiceInstance, ...]
    ) -> tuple[ServiceInstance, ...]:
        """The instances of `known` serving `topic`: the same tuple for as long as the
        directory's snapshot is, so the balancer's per-list structures stay built."""
        cached = self._serving_of.get(topic)
        if cached is None or cached[0] is not known:
            cached = self._serving_of[topic] = (
                known,
                tuple(i for i in known if i.meta.get("topic") == topic),
            )
        return cached[1]

    def _choose(self, request: _Request, instances: Sequence[ServiceInstance]) -> ServiceInstance:
        """Prefer instances this request has not tried; never the one that just failed."""
        if not request.tried:
            return self.balancer.choose(instances, request.event)
        fresh = [i for i in instances if i.instance_id not in request.tried]
        if not fresh and request.tried:
            fresh = [i for i in instances if i.instance_id != request.tried[-1]]
        return self.balancer.choose(fresh or instances, request.event)

    async def _send(self, request: _Request, instances: Sequence[ServiceInstance]) -> None:
        """Send one attempt; on a broker failure, the next attempt while budget remains."""
        while True:
            instance = self._choose(request, instances)
            request.attempt += 1
            request.instance = instance
            request.tried.append(instance.instance_id)
            request.sent_at = time.monotonic()
            request.span = start_attempt(
                request.trace, request.topic, request.event, instance.instance_id, request.attempt
            )
            self.balancer.started(instance)
            if not self._deadlines:
                self._wake.set()  # the timer sleeps until the first deadline: this one
            self._deadlines.append(
                (request.sent_at + self.attempt_timeout, request, request.attempt)
            )
            inbox = instance.meta.get("inbox") or self.routes.inbox(
                request.topic, instance.instance_id
            )
            try:
                # Not bounded here (an asyncio.timeout per request costs ~20 µs): a publish
                # the HA outbox holds is bounded by its timeout, and meanwhile the attempt
                # timer sends the request to another instance when the attempt expires.
                with activated(request.span):
                    await self.inner.publish(inbox, request.event)
                return
            except (Exception, asyncio.CancelledError) as exc:
                self._finish_attempt(request, ok=False, why=exc)
                if isinstance(exc, asyncio.CancelledError) or not self._may_retry(request, exc):
                    raise
                self.retries += 1
                log.info(
                    "request %s: send to %s failed (%s), retrying",
                    request.event.id,
                    instance.instance_id,
                    exc,
                )

    def _may_retry(self, request: _Request, exc: BaseException | None) -> bool:
        if exc is not None and not isinstance(exc, TransientError | TimeoutError):
            return False
        return request.attempt < self.attempts and time.monotonic() < request.expires

    def _finish_attempt(
        self, request: _Request, *, ok: bool, why: BaseException | str = "failed"
    ) -> None:
        """Tell the balancer (and the attempt's span) how the attempt ended (once per attempt)."""
        instance = request.instance
        if instance is not None:
            request.instance = None
            self.balancer.record(instance, time.monotonic() - request.sent_at, ok)
            end_span(request.span, None if ok else why)
            request.span = None

    async def _on_reply(self, reply: Any) -> None:
        request_id = self.routes.request_id(reply)
        request = self._pending.pop(request_id, None) if request_id is not None else None
        if request is None:
            return
        self.replies += 1
        ok = not self.routes.is_error(str(reply.type))
        self._finish_attempt(request, ok=ok, why="the instance replied with an error")

    async def _expire_attempts(self) -> None:
        """Retry attempts that got no reply in time (deadlines arrive in order)."""
        deadlines = self._deadlines
        while True:
            if not deadlines:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline, request, attempt = deadlines[0]
            delay = deadline - time.monotonic()
            if delay > 0:
                self._wake.clear()  # woken early when `_departed` puts a deadline first
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            deadlines.popleft()
            if request.attempt == attempt and self._pending.get(str(request.event.id)) is request:
                self.timeouts += 1
                try:
                    await self._retry(request, reason=f"no reply in {self.attempt_timeout:g} s")
                except Exception:  # keep the timer alive for every other request
                    log.exception("retrying request %s failed", request.event.id)
                    self._pending.pop(str(request.event.id), None)
                    self.abandoned += 1

    async def _retry(self, request: _Request, *, reason: str) -> None:
        """End the current attempt as failed; try another instance or give up."""
        failed = request.instance
        self._finish_attempt(request, ok=False, why=reason)
        request_id = str(request.event.id)
        instances: Sequence[ServiceInstance] = ()
        if self._may_retry(request, None) and self._directory is not None:
            found = await self._directory.instances(request.service)
            instances = self._serving(request.topic, found)
        if not instances:
            self._pending.pop(request_id, None)
            self.abandoned += 1
            log.warning(
                "request %s to %s: giving up after %d attempt(s) (%s)",
                request_id,
                request.topic,
                request.attempt,
                reason,
            )
            return
        self.retries += 1
        log.info(
            "request %s: %s from %s, retrying",
            request_id,
            reason,
            failed.instance_id if failed else "?",
        )
        try:
            await self._send(request, instances)
        except Exception as exc:
            self._pending.pop(request_id, None)
            self.abandoned += 1
            log.warning("request %s: retry failed: %s", request_id, exc)

    def _departed(self, service: str, gone: frozenset[str]) -> None:
        """Instances left the registry: their attempts in flight fail now, not at timeout."""
        now = time.monotonic()
        for request in self._pending.values():
            current = request.instance
            if request.service == service and current and current.instance_id in gone:
                self._deadlines.appendleft((now, request, request.attempt))
        self._wake.set()

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
        extra.update(
            instance_id=self.instance_id,
            routed=self.routed,
            unrouted=self.unrouted,
            retries=self.retries,
            attempt_timeouts=self.timeouts,
            abandoned=self.abandoned,
            replies=self.replies,
            in_flight=len(self._pending),
            registered=sorted(self._registrations),
        )
        if isinstance(self.balancer, Ejector):
            extra["ejected"] = list(self.balancer.statistics().ejected)
        return dataclasses.replace(
            stats,
            duplicates_dropped=stats.duplicates_dropped + self.duplicates_dropped,
            extra=extra,
        )
