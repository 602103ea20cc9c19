"""NatsCoreTransport: at-most-once delivery over core NATS subjects and queue groups.

One native subscription per (pattern, group) on the narrowest covering subject;
events are filtered exactly and delivered by `LocalDelivery`, in the subscription's
own nats-py task when the key has a single handler (see `deliver_serially`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from typing_extensions import override

from loom_ha._handlers import Handler, SubscriptionKey
from loom_ha.errors import SerializationError
from loom_ha.nats._base import NatsTransportBase
from loom_ha.nats._errors import map_nats_errors
from loom_ha.nats.subjects import digest, safe_name
from loom_ha.transport import Capabilities, TransportState, require_connected, require_usable

__all__ = ["NatsCoreTransport", "NatsTransport"]

log = logging.getLogger("loom_ha.nats")
_CONNECTED = TransportState.CONNECTED


class _Native:
    """One native subscription and what its callback learns about its delivery task."""

    __slots__ = ("drop_later", "sub", "task")

    def __init__(self) -> None:
        self.sub: Subscription | None = None
        self.task: asyncio.Task[Any] | None = None  # nats-py's task that runs the callback
        self.drop_later = False  # dropped from inside its own callback: unsubscribe after it

    def learn_task(self) -> asyncio.Task[Any]:
        """Remember the task nats-py runs the callback in (one per subscription)."""
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        return task

    async def unsubscribe(self, backend: str) -> None:
        sub, self.sub = self.sub, None
        if sub is None:
            return
        try:
            with map_nats_errors(what="unsubscribe"):
                await sub.unsubscribe()
        except Exception as exc:  # the connection is gone: so is the subscription
            log.debug("%s: unsubscribe: %s", backend, exc)


def queue_name(key: SubscriptionKey) -> str:
    """The NATS queue group of a group key: one per (group, pattern), so groups on
    different patterns that share a wide native subject never steal each other's events."""
    assert key.group is not None
    return f"{safe_name(key.group)}_{digest(key.group, key.raw)}"


class NatsCoreTransport(NatsTransportBase):
    """Core NATS: fast, at-most-once, no persistence.

    Events published while nobody subscribes, or while a subscriber is
    reconnecting, are lost. Publishes made while the client reconnects are
    buffered (``reconnect_buffer`` bytes) and sent after the reconnect.

    Args:
        servers: ``nats://`` / ``tls://`` URLs of one server or a cluster.
        subject_prefix: first subject token(s) (``loom``).
        dead_letter_prefix: where malformed messages are reported (``loomdlq``).
        codec: the event codec (decodes to Loom's class when loom-agent is installed).
        group_rule: the group of subscriptions made without one (Loom's requests).
        **connection: see `ConnectionOptions` (auth, TLS, reconnect timing).
    """

    backend_name = "nats-core"
    capabilities = Capabilities(
        persistent=False,
        ordered=True,
        at_least_once=False,
        competing_consumers=True,
        replays_history=False,
        native_wildcards=True,  # prefixes at token boundaries; others are filtered here
        dedup=False,
        cross_instance=True,
    )

    _subs: dict[SubscriptionKey, _Native]

    def _forget_native(self) -> None:
        self._subs = {}

    @override
    async def publish(self, topic: str, event: Any) -> None:
        """Send `event` on `topic` (at most once).

        Raises:
            NotConnectedError: not connected.
            ConfigurationError: the topic is invalid.
            ConnectionLostError: the reconnect buffer is full.
            PublishError: the server refused it (e.g. larger than max_payload).
        """
        conn = self._conn
        if conn.cell.state is not _CONNECTED:
            require_usable(conn.state, self.backend_name)
        subject = self.subjects.publish_subject(topic)
        payload = self.codec.encode(event)
        try:
            await conn.client.publish(subject, payload)
        except Exception:  # mapped only on failure: the hot path skips the context manager
            with map_nats_errors(topic=topic, event_id=event.id, what="publish"):
                raise
        self._counters.published += 1

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Deliver `topic` to `handler`; effective at the server when it returns.

        Also when another call is subscribing or unsubscribing the same pattern at the
        same time: every caller returns only once the native subscription is confirmed.

        Raises:
            NotConnectedError: not connected (or reconnecting).
            ConfigurationError: `topic` is not a valid pattern.
            ConnectionLostError: the server did not confirm in time.
        """
        require_connected(self._conn.state, self.backend_name)
        local = self.local
        group = local.resolve_group(topic, group)
        async with self._patterns.hold(topic):
            key, _ = local.add(topic, handler, group)
            if key in self._subs:
                return  # created and confirmed under this lock by an earlier call
            native = self._subs[key] = _Native()
            try:
                with map_nats_errors(what=f"subscribe {topic!r}"):
                    native.sub = await self._conn.client.subscribe(
                        self.subjects.native(key.pattern),
                        queue=queue_name(key) if key.group is not None else "",
                        cb=self._callback(key, native),
                    )
                # The server processed our SUB once the barrier returns: events published
                # from now on (by any connection to this server) reach us.
                await self._conn.barrier(self.options.connect_timeout)
            except BaseException:
                for emptied in await local.remove(topic, handler):
                    await self._drop(emptied)
                raise

    def _callback(self, key: SubscriptionKey, native: _Native) -> Any:
        """The nats-py callback of `key`'s native subscription (the receive hot path).

        nats-py runs it in one task per subscription, one message at a time, which is
        what `deliver_serially` needs.
        """
        deliver = self.local.deliver_serially
        decode = self.codec.decode
        malformed = self._malformed
        backend = self.backend_name
        if not key.pattern.is_wildcard:
            # An exact pattern's native subject is its topic's subject: nothing to map
            # back or filter (the subject encoding is reversible).
            exact = key.pattern.fixed

            async def on_exact(msg: Msg) -> None:
                task = native.task or native.learn_task()
                try:
                    event = decode(msg.data)
                except (SerializationError, ValueError) as exc:
                    await malformed(msg, exc)
                    return
                if not native.drop_later:
                    await deliver(key, exact, event, task)
                if native.drop_later:
                    await native.unsubscribe(backend)  # ends this task: nothing follows

            return on_exact

        to_topic = self.subjects.topic
        matches = key.pattern.matches
        counters = self._counters

        async def on_message(msg: Msg) -> None:
            task = native.task or native.learn_task()
            try:
                topic = to_topic(msg.subject)
                event = decode(msg.data)
            except (SerializationError, ValueError) as exc:
                await malformed(msg, exc)
                return
            if not native.drop_later:
                if matches(topic):
                    await deliver(key, topic, event, task)
                else:
                    counters.filtered += 1  # a wider native subject: the shared matcher decides
            if native.drop_later:
                await native.unsubscribe(backend)  # ends this task: nothing follows

        return on_message

    async def _malformed(self, msg: Msg, exc: Exception) -> None:
        """Count a message that is not a valid event and report it as a dead letter."""
        self.local.counters.malformed += 1
        reason = exc.reason if isinstance(exc, SerializationError) else str(exc)
        topic = self.topic_of(msg.subject)
        log.warning("%s: malformed message on %r: %s", self.backend_name, topic, reason)
        subject, payload = self._dead_letter_event(
            reason, topic, f"{self.backend_name}:{msg.subject}", 0, msg.data
        )
        try:
            with map_nats_errors(what="dead letter"):
                await self._conn.client.publish(subject, payload)
            self.local.counters.dead_lettered += 1
        except Exception:
            log.exception("%s: could not publish dead letter for %r", self.backend_name, topic)

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Stop delivering `topic` to `handler`; unknown pairs are ignored."""
        async with self._patterns.hold(topic):
            for key in await self.local.remove(topic, handler):
                await self._drop(key)

    async def _drop(self, key: SubscriptionKey) -> None:
        native = self._subs.pop(key, None)
        if native is None:
            return
        if native.task is not None and native.task is asyncio.current_task():
            # A handler running in this subscription's own task unsubscribed: nats-py
            # would cancel that task, and with it the handler. Drop it once it returned.
            native.drop_later = True
            return
        await native.unsubscribe(self.backend_name)

    @override
    def _extra_statistics(self) -> dict[str, Any]:
        return {"native_subscriptions": len(getattr(self, "_subs", {}))}

    @override
    def _pending(self) -> int:
        # Events wait here, not in a mailbox, while a key's only handler is busy.
        return sum(n.sub.pending_msgs for n in self._subs.values() if n.sub is not None)


NatsTransport = NatsCoreTransport
"""The core transport under the name STYLE.md gives it."""
