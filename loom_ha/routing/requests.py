"""The calling side of `BalancedTransport`: requests in flight, their attempts and deadlines.

A request goes to the inbox of the instance the balancer picks; its reply (paired by
request id) ends the attempt and feeds the balancer. One timer task, owned by the
transport's supervisor, walks the attempts' deadlines in order and sends an attempt that
got no reply, or whose instance left the registry, to another instance while the budget
lasts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from loom_ha._tasks import TaskSupervisor, wait_event
from loom_ha.balancing import Balancer
from loom_ha.discovery.instance import ServiceInstance
from loom_ha.errors import TransientError
from loom_ha.routing.directory import InstanceDirectory
from loom_ha.routing.routes import RequestRoutes
from loom_ha.tracing import activated, capture, end_span, start_attempt
from loom_ha.transport import Transport

__all__ = ["RequestRouter"]

log = logging.getLogger("loom_ha.routing")


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


class RequestRouter:
    """Requests from this process to the instances of a service; see the module docstring."""

    def __init__(
        self,
        inner: Transport,
        directory: InstanceDirectory,
        balancer: Balancer,
        routes: RequestRoutes,
        tasks: TaskSupervisor,
        *,
        attempt_timeout: float,
        attempts: int,
        budget_seconds: float | None,
    ) -> None:
        self.inner = inner
        self.directory = directory
        self.balancer = balancer
        self.routes = routes
        self.attempt_timeout = attempt_timeout
        self.attempts = attempts
        self.budget_seconds = budget_seconds
        self._tasks = tasks
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
        self.replies = self.abandoned = 0

    def clear(self) -> None:
        """Forget every request in flight (the transport disconnects; its tasks are gone)."""
        self._timer = None
        self._listening.clear()
        for request in self._pending.values():
            end_span(request.span, "disconnected before a reply")
        self._pending.clear()
        self._deadlines.clear()

    NONE_SENT: ClassVar[Mapping[str, int]] = MappingProxyType(
        dict.fromkeys(
            ("routed", "unrouted", "retries", "attempt_timeouts", "abandoned", "replies"), 0
        )
        | {"in_flight": 0}
    )
    """The counters of a transport that routes nothing (it has no registry)."""

    def statistics(self) -> dict[str, int]:
        """The counters `BalancedTransport.statistics()` reports."""
        return {
            "routed": self.routed,
            "unrouted": self.unrouted,
            "retries": self.retries,
            "attempt_timeouts": self.timeouts,
            "abandoned": self.abandoned,
            "replies": self.replies,
            "in_flight": len(self._pending),
        }

    # -- calling side ----------------------------------------------------------------------

    async def publish(self, topic: str, path: str, event: Any) -> None:
        """Send a request to `path`'s service: to a chosen instance, or to the broker group
        when no instance of it is known."""
        service = self.routes.service(path)
        known = self.directory.cached(service)
        if known is None:
            known = await self.directory.instances(service)
        instances = self._serving(topic, known)
        if not instances:
            self.unrouted += 1
            await self.inner.publish(topic, event)
            return
        if topic not in self._listening:
            await self._follow_replies(topic)
            instances = self._listed_now(topic, service, instances)
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

    def _listed_now(
        self, topic: str, service: str, before: tuple[ServiceInstance, ...]
    ) -> tuple[ServiceInstance, ...]:
        """The instances serving `topic` as the directory lists them now (`before` if none).

        Read again after a broker call (subscribing to replies; a send that failed, maybe
        after an HA outbox held it): the departure of an instance that left meanwhile was
        announced (`departed`) before this request was in flight to it, so a choice from
        the older list could wait out a whole attempt timeout on it.
        """
        known = self.directory.cached(service)
        return (self._serving(topic, known) if known else ()) or before

    def _choose(self, request: _Request, instances: Sequence[ServiceInstance]) -> ServiceInstance:
        """Prefer instances this request has not tried; never the one that just failed."""
        if not request.tried:
            return self.balancer.choose(instances, request.event)
        fresh = [i for i in instances if i.instance_id not in request.tried]
        if not fresh and request.tried:
            fresh = [i for i in instances if i.instance_id != request.tried[-1]]
        return self.balancer.choose(fresh or instances, request.event)

    async def _send(self, request: _Request, instances: tuple[ServiceInstance, ...]) -> None:
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
                instances = self._listed_now(request.topic, request.service, instances)

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
                self._wake.clear()  # woken early when `departed` puts a deadline first
                await wait_event(self._wake, delay)
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
        instances: tuple[ServiceInstance, ...] = ()
        if self._may_retry(request, None):
            found = await self.directory.instances(request.service)
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

    def departed(self, service: str, gone: frozenset[str]) -> None:
        """Instances left the registry: their attempts in flight fail now, not at timeout."""
        now = time.monotonic()
        for request in self._pending.values():
            current = request.instance
            if request.service == service and current and current.instance_id in gone:
                self._deadlines.appendleft((now, request, request.attempt))
        self._wake.set()
