"""HATransport: the reconnecting core users put under LoomApp.

It wraps any transport and adds what an application needs while brokers fail:

* an observable state machine (connecting → connected → reconnecting → closed);
* recovery through `RetryPolicy` (backoff with jitter, never gives up unless
  configured), rebuilding the inner transport on the next endpoint when it is
  gone for good, and restoring every subscription before queued publishes resume;
* a bounded outbox (`loom_ha.ha.outbox`) so publishes made while the broker is
  away wait, fail fast or drop the oldest, and replay with the same event id;
* a dedup window (`loom_ha.ha.dedup`) so handlers see an event once across
  replays and redeliveries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from typing_extensions import override

from loom_ha._handlers import Handler
from loom_ha._state import CellTransport, StateCell
from loom_ha._tasks import TaskSupervisor
from loom_ha.errors import (
    ConnectionLostError,
    FailoverExhaustedError,
    LoomHAError,
    NotConnectedError,
    TransientError,
    TransportClosedError,
)
from loom_ha.ha.dedup import DedupWindow, DedupWrappers
from loom_ha.ha.endpoints import (
    DEAD_INNER,
    Endpoints,
    InnerWatch,
    TransportFactory,
    follow_reconnect,
)
from loom_ha.ha.outbox import Outbox, OutboxConfig, OutboxPolicy
from loom_ha.ha.subscriptions import Subscription, SubscriptionBook
from loom_ha.retry import RECOVERY, RetryPolicy
from loom_ha.topics import parse_pattern, validate_topic
from loom_ha.tracing import end_span, start_publish, tracing_active
from loom_ha.transport import (
    Transport,
    TransportState,
    TransportStatistics,
    require_connected,
    require_usable,
)

log = logging.getLogger("loom_ha.ha")

_CONNECTED, _RECONNECTING = TransportState.CONNECTED, TransportState.RECONNECTING
PUBLISH_CHUNK = 256
"""Events per inner `publish_many` call: within one round trip of every backend (Redis
pipelines 512), so a chunk the broker failed on is retried like one publish."""


def _broker_failure(exc: BaseException) -> bool:
    """True for errors that mean "the broker is away" rather than "this call is wrong"."""
    return isinstance(exc, TransientError | FailoverExhaustedError)


class HATransport(CellTransport):
    """A transport that survives broker failures; see the module docstring.

    Args:
        target: the inner transport, or a factory of inner transports, or a list of
            factories (one per endpoint, tried in turn on failover).
        retry: how recovery retries; the default never gives up.
        outbox: the outbox settings (policy, size, block timeout).
        dedup: the dedup window; ``None`` turns deduplication off. The default is an
            in-process window; pass `loom_ha.redis.RedisDedup` (or `loom_ha.nats.NatsDedup`)
            to share it across instances.
        health_interval: seconds between checks of the state of an inner transport that
            does not announce its changes (every loom-ha backend does: they are not polled).
    """

    def __init__(
        self,
        target: Transport | TransportFactory | Sequence[TransportFactory],
        *,
        retry: RetryPolicy | None = None,
        outbox: OutboxConfig | None = None,
        dedup: DedupWindow | bool | None = True,
        health_interval: float = 0.2,
    ) -> None:
        self._endpoints = Endpoints(target)
        self._inner: Transport = self._endpoints.next_transport()
        self._retry = retry or RECOVERY
        self._outbox = Outbox(outbox or OutboxConfig())
        self._dedup = DedupWrappers(dedup)
        self.capabilities = replace(self._inner.capabilities, dedup=self._dedup.enabled)
        self._cell = StateCell("loom_ha.ha")
        self._book = SubscriptionBook()
        self._tasks = TaskSupervisor("loom_ha.ha")
        self._recovery: asyncio.Task[None] | None = None
        self._watch = InnerWatch(self._inner_changed, self._tasks, health_interval)
        self.reconnects = 0
        self.published = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def inner(self) -> Transport:
        """The transport currently in use (changes on endpoint failover)."""
        return self._inner

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the state is CONNECTED (after a reconnect, say)."""
        async with asyncio.timeout(timeout):
            await self._cell.wait_connected()

    # -- lifecycle -----------------------------------------------------------------------

    @override
    async def connect(self) -> None:
        """Connect (retrying per the policy); a no-op while connected or reconnecting."""
        if self._state in (TransportState.CONNECTED, TransportState.RECONNECTING):
            return
        if self._state is TransportState.CLOSED:
            raise TransportClosedError("HATransport is closed")
        if self._state is TransportState.CONNECTING:
            await self._wait_first_connect()
            return
        self._tasks.reopen()
        self._cell.set(TransportState.CONNECTING)
        # The attempt is a supervised task, so disconnect()/close() from another task
        # cancel it and wait until the inner transport cleaned up: nothing it was opening
        # outlives them (Loom starts a connect in a task nobody awaits).
        attempt = self._tasks.spawn(
            self._retry.call(self._attach, on_retry=self._log_retry), name="connect"
        )
        try:
            await attempt
        except asyncio.CancelledError:
            if self._connecting():
                self._cell.set(TransportState.DISCONNECTED)  # our caller was cancelled
            if _cancelling():
                raise
            raise self._stopped_while_connecting() from None
        except BaseException:
            if self._connecting():
                self._cell.set(TransportState.DISCONNECTED)
            raise
        if not self._connecting():
            raise self._stopped_while_connecting()
        self._cell.set(TransportState.CONNECTED)
        self._watch.follow(self._inner)

    async def _wait_first_connect(self) -> None:
        """A second connect() while the first is under way: share its outcome."""
        ended = asyncio.Event()
        remove = self._cell.add_listener(lambda state: ended.set())
        try:
            while self._state is TransportState.CONNECTING:
                ended.clear()
                await ended.wait()
        finally:
            remove()
        if self._state not in (TransportState.CONNECTED, TransportState.RECONNECTING):
            raise self._stopped_while_connecting()

    def _connecting(self) -> bool:
        """Still CONNECTING (read afresh: another task may have closed us meanwhile)."""
        return self._cell.state is TransportState.CONNECTING

    def _stopped_while_connecting(self) -> Exception:
        if self._state is TransportState.CLOSED:
            return TransportClosedError("HATransport was closed while connecting")
        return NotConnectedError(f"HATransport connect ended: state is {self._state.value}")

    async def _attach(self) -> None:
        """Connect the inner transport and restore every recorded subscription on it."""
        inner = self._inner
        if inner.statistics().state in DEAD_INNER:
            await inner.connect()
        self._book.inner_replaced()
        await self._book.reconcile(inner, self._wrapped)

    @override
    async def disconnect(self) -> None:
        """Stop recovery and the inner transport; waiting publishers get an error."""
        if self._state in (TransportState.NEW, TransportState.DISCONNECTED, TransportState.CLOSED):
            return
        self._cell.set(TransportState.DISCONNECTED)
        await self._shutdown()

    @override
    async def close(self) -> None:
        """Disconnect for good: later calls raise `TransportClosedError`."""
        if self._state is not TransportState.CLOSED:
            self._cell.set(TransportState.CLOSED)
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._outbox.fail_all(TransportClosedError("HATransport closed before sending"))
        try:
            await self._tasks.aclose()
        finally:
            self._recovery = None
            self._book.clear()
            self._watch.stop()
            await self._inner.disconnect()
            await self._dedup.close()

    # -- operations ----------------------------------------------------------------------

    @override
    async def publish(
        self,
        topic: str,
        event: Any,
        *,
        policy: OutboxPolicy | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish now, or per the outbox policy while the broker is away.

        The one place loom-ha traces publishing: with a tracer provider set, the call is a
        PRODUCER span whose context the event carries (`loom_ha.tracing`).

        Args:
            policy: overrides the outbox policy for this call.
            timeout: overrides the BLOCK timeout for this call.
        """
        state = self._cell.state  # read once: this is every event's path
        if state is not _CONNECTED and state is not _RECONNECTING:
            require_connected(state, "ha")
        validate_topic(topic)
        span = start_publish(topic, event)  # None unless a tracer provider is configured
        try:
            if state is _CONNECTED and not self._outbox.depth:
                try:
                    await self._inner.publish(topic, event)
                except Exception as exc:
                    if not _broker_failure(exc):
                        raise
                    self._start_recovery(exc)
                else:
                    self.published += 1
                    if span is not None:
                        end_span(span, None)
                    return
            await self._outbox.put(topic, event, policy=policy, timeout=timeout)
        except BaseException as exc:
            if span is not None:
                end_span(span, exc)
            raise
        if span is not None:
            end_span(span, None)

    @override
    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """`publish()` for many events, pipelined by the inner transport while connected.

        Chunks of `PUBLISH_CHUNK` (one round trip on every backend) go to the inner
        `publish_many`; when the broker fails during one, that chunk and the rest take the
        outbox path item by item, as single publishes do. With tracing on, every event goes
        through `publish()` so that each gets its span.
        """
        batch = list(items)
        if tracing_active():
            for topic, event in batch:
                await self.publish(topic, event)
            return
        for start in range(0, len(batch), PUBLISH_CHUNK):
            chunk = batch[start : start + PUBLISH_CHUNK]
            state = self._cell.state
            require_usable(state, "ha")
            if state is _CONNECTED and not self._outbox.depth:
                try:
                    await self._inner.publish_many(chunk)
                except Exception as exc:
                    if not _broker_failure(exc):
                        raise
                    self._start_recovery(exc)
                else:
                    self.published += len(chunk)
                    continue
            for topic, event in chunk:
                await self.publish(topic, event)

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Subscribe now; while reconnecting, recorded and made live before replays resume."""
        require_usable(self._state, "ha")
        parse_pattern(topic)
        sub = Subscription(topic, handler, group)
        if not self._book.want(sub):
            return
        if self._state is TransportState.CONNECTED:
            try:
                await self._book.attach(self._inner, sub, self._wrapped(sub))
            except Exception as exc:
                if self._state in (TransportState.DISCONNECTED, TransportState.CLOSED):
                    self._book.unwant(topic, handler)  # closed meanwhile: say so, once
                    try:
                        require_usable(self._state, "ha")
                    except LoomHAError as unusable:
                        raise unusable from exc
                # The inner transport gone (a recovery disconnected it) is a broker failure.
                gone = isinstance(exc, NotConnectedError | TransportClosedError)
                if not (_broker_failure(exc) or gone):
                    self._book.unwant(topic, handler)
                    raise
                self._start_recovery(exc)  # made live by the recovery, before replays

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Forget the subscription (while reconnecting: removed once the broker is back)."""
        try:
            for sub in self._book.unwant(topic, handler):
                if self._state is TransportState.CONNECTED and self._book.is_live(sub):
                    try:
                        await self._book.detach(self._inner, sub)
                    except Exception as exc:
                        if not _broker_failure(exc):
                            raise
                        self._start_recovery(exc)
        finally:
            await self._release(handler)

    def _wrapped(self, sub: Subscription) -> Handler:
        """`sub`'s handler behind its dedup wrapper (the window depends on whether it competes)."""
        group = self._inner.resolve_group(sub.topic, sub.group)
        return self._dedup.wrap(sub.handler, sub.topic, group)

    async def _release(self, handler: Handler) -> None:
        """Drop `handler`'s dedup wrapper once nothing wants it and no inner side holds it."""
        if not self._book.holds(handler):
            await self._dedup.forget(handler)

    # -- recovery ------------------------------------------------------------------------

    def _start_recovery(self, cause: BaseException | None) -> None:
        """Enter RECONNECTING and start the one recovery task (if not running)."""
        if self._state not in (TransportState.CONNECTED, TransportState.RECONNECTING):
            return
        if self._recovery is not None and not self._recovery.done():
            return
        log.warning("broker connection lost (%s); recovering", cause)
        self.reconnects += 1
        self._cell.set(TransportState.RECONNECTING)
        self._recovery = self._tasks.spawn(self._recover(), name="recovery")

    async def _recover(self) -> None:
        try:
            await self._retry.call(self._recover_once, on_retry=self._log_retry)
        except Exception as exc:
            # Only a finite RetryPolicy gets here: we were told to give up.
            log.error("giving up on the broker: %s", exc)
            self._outbox.fail_all(ConnectionLostError(f"gave up reconnecting: {exc}"))
            self._cell.set(TransportState.DISCONNECTED)
            return
        self._cell.set(TransportState.CONNECTED)

    async def _recover_once(self) -> None:
        """One attempt: get a live inner transport, restore subscriptions, replay the outbox."""
        try:
            await self._recover_steps()
        except FailoverExhaustedError as exc:
            # The inner transport's own retries ran out; ours go on.
            raise ConnectionLostError(str(exc)) from exc

    async def _recover_steps(self) -> None:
        state = self._inner.statistics().state
        if state in DEAD_INNER:
            await self._rebuild_inner()
        else:
            if state is not TransportState.CONNECTED:
                await follow_reconnect(self._inner, self._retry.wait_max)
            # What was subscribed or unsubscribed meanwhile, before the replays.
            for handler in await self._book.reconcile(self._inner, self._wrapped):
                await self._release(handler)
        await self._outbox.drain(self._send_replay)

    async def _rebuild_inner(self) -> None:
        """Replace a dead inner transport with a fresh one on the next endpoint."""
        old = self._inner
        self._watch.stop()
        await old.disconnect()
        self._inner = self._endpoints.next_transport()
        try:
            await self._attach()
        except BaseException:
            await self._inner.disconnect()
            raise
        self._watch.follow(self._inner)

    async def _send_replay(self, topic: str, event: Any) -> None:
        try:
            await self._inner.publish(topic, event)
        except FailoverExhaustedError as exc:
            raise ConnectionLostError(str(exc)) from exc  # the broker, not this event
        self.published += 1

    def _inner_changed(self, state: TransportState) -> None:
        """Recover as soon as the inner transport is no longer connected."""
        if state is not TransportState.CONNECTED and self._state is TransportState.CONNECTED:
            self._start_recovery(ConnectionLostError(f"inner transport is {state.value}"))

    def _log_retry(self, attempt: int, error: BaseException, delay: float) -> None:
        log.warning("attempt %d failed (%s); next try in %.2fs", attempt, error, delay)

    # -- observability -------------------------------------------------------------------

    @property
    def outbox_config(self) -> OutboxConfig:
        """The outbox settings in force."""
        return self._outbox.config

    @property
    def outbox_depth(self) -> int:
        """Publishes waiting for the broker."""
        return self._outbox.depth

    @override
    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        return self._inner.resolve_group(pattern, group)

    @override
    def statistics(self) -> TransportStatistics:
        inner = self._inner.statistics()
        return replace(
            inner,
            backend=f"ha({inner.backend})",
            state=self._state,
            subscriptions=len(self._book.wanted),
            reconnects=self.reconnects + inner.reconnects,
            duplicates_dropped=self._dedup.duplicates_dropped,
            outbox_depth=self._outbox.depth,
            outbox_dropped=self._outbox.dropped,
        )


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not a task it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
