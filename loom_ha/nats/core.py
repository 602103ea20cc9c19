"""NatsCoreTransport: at-most-once delivery over core NATS subjects and queue groups.

One native subscription per (pattern, group) on the narrowest covering subject;
events are filtered exactly and delivered by `LocalDelivery`.
"""

from __future__ import annotations

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
from loom_ha.topics import validate_topic
from loom_ha.transport import Capabilities, require_connected

__all__ = ["NatsCoreTransport", "NatsTransport"]

log = logging.getLogger("loom_ha.nats")


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

    _subs: dict[SubscriptionKey, Subscription]

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
        self._check_can_send()
        validate_topic(topic)
        payload = self.codec.encode(event)
        try:
            await self._conn.client.publish(self.subjects.subject(topic), payload)
        except Exception:  # mapped only on failure: the hot path skips the context manager
            with map_nats_errors(topic=topic, event_id=event.id, what="publish"):
                raise
        self._local.counters.published += 1

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Deliver `topic` to `handler`; effective at the server when it returns.

        Raises:
            NotConnectedError: not connected (or reconnecting).
            ConfigurationError: `topic` is not a valid pattern.
            ConnectionLostError: the server did not confirm in time.
        """
        require_connected(self._conn.state, self.backend_name)
        local = self._local
        group = local.resolve_group(topic, group)
        key, is_new = local.add(topic, handler, group)
        if not is_new:
            return
        client = self._conn.client
        try:
            with map_nats_errors(what=f"subscribe {topic!r}"):
                sub = await client.subscribe(
                    self.subjects.native(key.pattern),
                    queue=queue_name(key) if key.group is not None else "",
                    cb=self._callback(key),
                )
                self._subs[key] = sub
                # The PONG proves the server processed our SUB: events published from now on arrive.
                await client.flush(timeout=self.options.connect_timeout)  # type: ignore[arg-type]
        except BaseException:
            await self._drop(key)
            await local.remove(topic, handler)
            raise

    def _callback(self, key: SubscriptionKey) -> Any:
        dispatch = self._local.dispatch
        decode = self.codec.decode
        to_topic = self.subjects.topic

        async def on_message(msg: Msg) -> None:
            try:
                topic = to_topic(msg.subject)
                event = decode(msg.data)
            except (SerializationError, ValueError) as exc:
                await self._malformed(msg, exc)
                return
            dispatch(key, topic, event)

        return on_message

    async def _malformed(self, msg: Msg, exc: Exception) -> None:
        """Count a message that is not a valid event and report it as a dead letter."""
        self._local.counters.malformed += 1
        reason = exc.reason if isinstance(exc, SerializationError) else str(exc)
        topic = self._topic_of(msg.subject)
        log.warning("%s: malformed message on %r: %s", self.backend_name, topic, reason)
        subject, payload = self._dead_letter_event(
            reason, topic, f"{self.backend_name}:{msg.subject}", 0, msg.data
        )
        try:
            with map_nats_errors(what="dead letter"):
                await self._conn.client.publish(subject, payload)
            self._local.counters.dead_lettered += 1
        except Exception:
            log.exception("%s: could not publish dead letter for %r", self.backend_name, topic)

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Stop delivering `topic` to `handler`; unknown pairs are ignored."""
        for key in await self._local.remove(topic, handler):
            await self._drop(key)

    async def _drop(self, key: SubscriptionKey) -> None:
        sub = self._subs.pop(key, None)
        if sub is None:
            return
        try:
            with map_nats_errors(what="unsubscribe"):
                await sub.unsubscribe()
        except Exception as exc:  # the connection is gone: so is the subscription
            log.debug("%s: unsubscribe: %s", self.backend_name, exc)

    @override
    def _extra_statistics(self) -> dict[str, Any]:
        return {"native_subscriptions": len(getattr(self, "_subs", {}))}


NatsTransport = NatsCoreTransport
"""The core transport under the name STYLE.md gives it."""
