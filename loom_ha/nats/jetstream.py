"""JetStreamTransport: at-least-once delivery through a JetStream stream and pull consumers.

Publishes wait for the stream's ack (deduplicated by ``Nats-Msg-Id`` = event id);
each subscription key is one consumer: a shared durable per group, a private one
per fan-out subscription (new events only). Dead letters go to their own stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from typing_extensions import Unpack, override

from loom_ha._handlers import Handler, SubscriptionKey
from loom_ha.errors import ConfigurationError, ConnectionLostError, LoomHAError
from loom_ha.event import EventCodec
from loom_ha.nats._base import NatsTransportBase
from loom_ha.nats._consumer import PullConsumer
from loom_ha.nats._errors import PublishInProgressError, map_nats_errors, translate
from loom_ha.nats.connection import DEFAULT_SERVERS, ConnectionOptions, NatsConnection
from loom_ha.nats.options import ConsumerOptions, StreamOptions
from loom_ha.nats.subjects import (
    DEFAULT_DEAD_LETTER_PREFIX,
    DEFAULT_PREFIX,
    digest,
    safe_name,
)
from loom_ha.retry import within
from loom_ha.topics import validate_topic
from loom_ha.transport import (
    Capabilities,
    GroupRule,
    loom_request_groups,
    require_connected,
    require_usable,
)

__all__ = ["ConsumerOptions", "JetStreamTransport", "StreamOptions"]

log = logging.getLogger("loom_ha.nats.jetstream")

_STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"
MSG_ID = "Nats-Msg-Id"
_Sent = tuple[asyncio.Future[Any], str, bytes, str, str]
"""A pipelined publish: its ack future, then `_publish_acked`'s arguments to retry it."""
_RETRIED = (ConnectionLostError, PublishInProgressError)  # a pipelined publish retries these
PUBLISH_WAIT_MAX = 0.4
"""Longest backoff between publish attempts, seconds: an attempt that timed out already
waited `ack_timeout`, so the pause after it stays short (ack_timeout + 0.4 + 0.1 jitter = 2 s)."""


class JetStreamTransport(NatsTransportBase):
    """JetStream: persistent, at-least-once, deduplicated publishes, competing groups.

    * `publish()` returns once the stream stored the event (replicated when R3) and
      retries lost connections with the same ``Nats-Msg-Id`` for up to
      `publish_timeout` seconds, then raises: every publish arrives or raises. A
      connection lost (or a server declared dead) while an ack is due is retried at
      once; "duplicate message id is in process" (10158) means an earlier attempt is
      still being stored and is confirmed by publishing again, never raised.
    * Handlers are acked after they succeed; a failure naks with backoff; after
      ``policy.max_deliveries`` attempts the event goes to the dead-letter stream
      with why it died. Duplicates caused by lost acks are dropped per consumer.
    * New fan-out subscribers see new events only (``consumer.start='all'`` replays).

    `subject_prefix`, `dead_letter_prefix`, `codec`, `group_rule`: as `NatsCoreTransport`.

    Args:
        servers: ``nats://`` / ``tls://`` URLs of one server or a cluster.
        stream: stream options; consumer: consumer options.
        publish_timeout: total seconds `publish()` keeps retrying.
        ack_timeout: seconds to wait for one publish ack before retrying (with the same
            message id). With the retry backoff capped at `PUBLISH_WAIT_MAX`, a publish goes
            through within ~2 s of the stream answering again (a new leader elected).
        **connection: see `ConnectionOptions` (auth, TLS, reconnect timing).
    """

    backend_name = "nats-jetstream"
    capabilities = Capabilities(
        persistent=True,
        ordered=True,  # per consumer, as long as nothing is redelivered
        at_least_once=True,
        competing_consumers=True,
        replays_history=False,
        native_wildcards=True,
        dedup=True,
        cross_instance=True,
    )

    def __init__(
        self,
        servers: Sequence[str] | str = DEFAULT_SERVERS,
        *,
        stream: StreamOptions | None = None,
        consumer: ConsumerOptions | None = None,
        publish_timeout: float = 30.0,
        ack_timeout: float = 1.5,
        subject_prefix: str = DEFAULT_PREFIX,
        dead_letter_prefix: str = DEFAULT_DEAD_LETTER_PREFIX,
        codec: EventCodec[Any] | None = None,
        group_rule: GroupRule | None = loom_request_groups,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(
            servers,
            subject_prefix=subject_prefix,
            dead_letter_prefix=dead_letter_prefix,
            codec=codec,
            group_rule=group_rule,
            **connection,
        )
        if publish_timeout <= 0 or ack_timeout <= 0:
            raise ConfigurationError("publish_timeout and ack_timeout must be > 0")
        self.stream = stream or StreamOptions()
        self.consumer_options = consumer or ConsumerOptions()
        self.ack_timeout = ack_timeout
        self._publish_retry = within(publish_timeout, wait_max=PUBLISH_WAIT_MAX)
        self._instance = uuid.uuid4().hex[:10]
        self._fanout_ids = itertools.count(1)
        self._js: JetStreamContext | None = None
        self.replicas = self.stream.replicas or 1
        self.duplicates = 0  # publishes the stream recognised as already stored
        self.in_progress = 0  # 10158 answers: an earlier attempt was still being stored

    # -- what the consumers read -----------------------------------------------------

    @property
    def connection(self) -> NatsConnection:
        """The shared connection (state, client)."""
        return self._conn

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the open connection."""
        if self._js is None:
            require_connected(self._conn.state, self.backend_name)
            raise AssertionError("unreachable")
        return self._js

    def consumer_config(self, key: SubscriptionKey, name: str, start: int | None) -> ConsumerConfig:
        """The consumer of `key`: durable, explicit ack, filtered to its native subject."""
        o = self.consumer_options
        if start is not None:
            deliver, opt_start = DeliverPolicy.BY_START_SEQUENCE, start
        else:
            deliver = DeliverPolicy.NEW if o.start == "new" else DeliverPolicy.ALL
            opt_start = None
        return ConsumerConfig(
            name=name,
            durable_name=name,
            deliver_policy=deliver,
            opt_start_seq=opt_start,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=o.ack_wait,
            max_deliver=-1,  # the client counts attempts and dead-letters (DeliveryPolicy)
            filter_subject=self.subjects.native(key.pattern),
            max_ack_pending=o.max_ack_pending,
            inactive_threshold=o.fanout_inactive_threshold if key.group is None else None,
        )

    def consumer_name(self, key: SubscriptionKey) -> str:
        """Group members share a durable (same group + pattern, any process); a fan-out
        subscription gets a consumer of its own.

        A fan-out name is never reused, not even for the same pattern: deleting the
        previous consumer is best effort (bounded wait), and a late delete must not
        remove the consumer of a newer subscription.
        """
        if key.group is not None:
            return f"g_{safe_name(key.group)}_{digest(key.group, key.raw)}"
        return f"f_{self._instance}_{digest(key.raw)}_{next(self._fanout_ids)}"

    # -- lifecycle -------------------------------------------------------------------

    def _forget_native(self) -> None:
        self._consumers: dict[SubscriptionKey, PullConsumer] = {}
        self._js = None

    @override
    async def _after_connect(self) -> None:
        client = self._conn.client
        self._js = client.jetstream(timeout=max(2.0, self.ack_timeout))
        if self.stream.replicas is None:
            self.replicas = min(3, len(client.servers)) if len(client.servers) >= 3 else 1
        if not self.stream.manage:
            return
        s = self.stream
        storage = StorageType.FILE if s.storage == "file" else StorageType.MEMORY
        main = StreamConfig(
            name=s.name,
            subjects=[self.subjects.all_subjects],
            num_replicas=self.replicas,
            max_age=s.max_age,
            max_msgs=s.max_msgs,
            max_bytes=s.max_bytes,
            duplicate_window=s.duplicate_window,
            storage=storage,
        )
        dead = StreamConfig(
            name=s.dead_letter_stream,
            subjects=[self.subjects.all_dead_letters],
            num_replicas=self.replicas,
            max_age=s.dead_letter_max_age,
            duplicate_window=s.duplicate_window,
            storage=storage,
        )
        setup = within(max(5.0, self.options.connect_timeout), wait_max=1.0)
        for config in (main, dead):
            await setup.call(lambda config=config: self._ensure_stream(config))  # type: ignore[misc]

    async def _ensure_stream(self, config: StreamConfig) -> None:
        with map_nats_errors(what=f"stream {config.name}"):
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS:
                    raise ConfigurationError(f"stream {config.name}: {exc.description}") from exc
                await self.js.update_stream(config)

    @override
    async def _before_close(self) -> None:
        consumers = list(self._consumers.items())
        self._consumers = {}
        for key, consumer in consumers:
            await consumer.stop(delete=key.group is None)

    # -- publishing ------------------------------------------------------------------

    @override
    async def publish(self, topic: str, event: Any) -> None:
        """Store `event` in the stream; returns once the stream acked it.

        Raises:
            NotConnectedError: not connected.
            ConfigurationError: the topic is invalid.
            FailoverExhaustedError: no ack within `publish_timeout` (``__cause__`` says why).
            PublishError: the stream refused it.
        """
        require_usable(self._conn.state, self.backend_name)
        validate_topic(topic)
        subject = self.subjects.subject(topic)
        await self._publish_acked(subject, self.codec.encode(event), event.id, topic)
        self.local.counters.published += 1

    async def _publish_acked(self, subject: str, payload: bytes, msg_id: str, topic: str) -> None:
        """Publish until the stream acks, every attempt with the same message id.

        The one retry loop of JetStream publishes: a lost connection, a timeout, an
        election (503) and an attempt still being stored (10158) are all retried with
        backoff; the first answer with a sequence (new or ``duplicate``) ends it.
        """
        headers = {MSG_ID: msg_id}
        conn = self._conn

        async def once() -> None:
            try:
                ack = await conn.until_lost(
                    self.js.publish(subject, payload, timeout=self.ack_timeout, headers=headers)
                )
            except Exception as exc:  # mapped here, not around every call: the hot path
                mapped = translate(exc, topic=topic, event_id=msg_id, what="publish")
                if isinstance(mapped, PublishInProgressError):
                    self.in_progress += 1
                if mapped is exc:
                    raise
                raise mapped from exc
            if ack.duplicate:
                self.duplicates += 1

        await self._publish_retry.call(once)

    async def publish_async(self, topic: str, event: Any) -> Coroutine[Any, Any, None]:
        """Send `event` without waiting for the stream's ack; await the result for it.

        The returned awaitable completes once the event is stored (retrying like
        `publish()`, with the same ``Nats-Msg-Id``) or raises; it must be awaited.
        """
        return self._confirm(await self._send(topic, event))

    async def _confirm(self, sent: _Sent) -> None:
        error = (await self._confirm_all([sent]))[0]
        if error is not None:
            raise error

    async def _send(self, topic: str, event: Any) -> _Sent:
        """A pipelined publish's first attempt: sent, its ack not waited for."""
        require_usable(self._conn.state, self.backend_name)
        validate_topic(topic)
        subject, payload, msg_id = self.subjects.subject(topic), self.codec.encode(event), event.id
        try:
            future = await self.js.publish_async(subject, payload, headers={MSG_ID: msg_id})
        except Exception:
            with map_nats_errors(topic=topic, event_id=msg_id, what="publish"):
                raise
        return future, subject, payload, msg_id, topic

    async def _confirm_all(self, sent: Sequence[_Sent]) -> list[BaseException | None]:
        """Wait for the acks of `sent`; each one's error (None: stored), in order.

        One deadline and one `until_lost` for them all, not a task and two timers per event
        (most of a pipelined publish's CPU). Those without an ack in time, or worth another
        try, go through `_publish_acked` concurrently, as `publish()` would.
        """
        pending = [s[0] for s in sent if not s[0].done()]
        if pending:
            try:
                async with asyncio.timeout(self.ack_timeout):
                    await self._conn.until_lost(asyncio.wait(pending))
            except TimeoutError:
                pass  # too slow, or the connection was lost: retried below
            finally:  # also when cancelled: frees nats-py's slot of each (a late ack is ignored)
                for future in pending:
                    future.cancel()
        errors = [self._outcome(s) for s in sent]
        retry = [i for i, e in enumerate(errors) if isinstance(e, _RETRIED)]
        again = [self._publish_acked(*sent[i][1:]) for i in retry]
        for i, error in zip(
            retry, await asyncio.gather(*again, return_exceptions=True), strict=True
        ):
            errors[i] = error
            if error is None:
                self.local.counters.published += 1
        return errors

    def _outcome(self, sent: _Sent) -> BaseException | None:
        """What the ack future of `sent` says: None (stored; counted), else the error."""
        future, _, _, msg_id, topic = sent
        if future.cancelled():
            return ConnectionLostError("publish: no ack within ack_timeout")
        if (exc := future.exception()) is not None:
            return translate(exc, topic=topic, event_id=msg_id, what="publish")
        if future.result().duplicate:
            self.duplicates += 1
        self.local.counters.published += 1
        return None

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Publish `(topic, event)` pairs pipelined; returns once all are stored.

        Raises:
            LoomHAError: the first failure (the others were still awaited). A bad item
                (topic or event) raises after the items before it were stored; the items
                after it are not sent.
        """
        sent: list[_Sent] = []
        bad_item: LoomHAError | None = None
        try:
            for topic, event in items:
                sent.append(await self._send(topic, event))
        except LoomHAError as exc:
            bad_item = exc
        except BaseException:  # cancelled: the acks are no longer anyone's to wait for
            for future, *_ in sent:
                future.cancel()
            raise
        for error in await self._confirm_all(sent):
            if error is not None:
                raise error
        if bad_item is not None:
            raise bad_item

    async def dead_letter(
        self, reason: str, topic: str, origin: str, attempts: int, raw: bytes, msg_id: str
    ) -> bool:
        """Store a dead letter in the dead-letter stream; False when that failed."""
        subject, payload = self._dead_letter_event(reason, topic, origin, attempts, raw)
        try:
            await self._publish_acked(subject, payload, msg_id, topic)
        except LoomHAError as exc:
            log.error("dead letter for %r not stored (%s); will retry", topic, exc)
            return False
        self.local.counters.dead_lettered += 1
        return True

    # -- subscriptions -----------------------------------------------------------------

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Deliver `topic` to `handler`; the consumer exists when this returns.

        Raises:
            NotConnectedError: not connected.
            ConfigurationError: `topic` is not a valid pattern.
            FailoverExhaustedError: the consumer could not be created in time.
        """
        require_connected(self._conn.state, self.backend_name)
        local = self.local
        group = local.resolve_group(topic, group)
        async with self._patterns.hold(topic):
            key, _ = local.table.add(topic, handler, group)
            if key in self._consumers:
                return  # created under this lock by an earlier call: it exists
            consumer = PullConsumer(self, key, self.consumer_name(key))
            self._consumers[key] = consumer
            retry = within(self.consumer_options.subscribe_timeout, wait_max=1.0)
            try:
                await consumer.start(retry)
            except BaseException:
                self._consumers.pop(key, None)
                await consumer.stop(delete=key.group is None)
                for emptied in local.table.remove(topic, handler):
                    other = self._consumers.pop(emptied, None)
                    if other is not None:
                        await other.stop(delete=emptied.group is None)
                raise

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Stop delivering `topic` to `handler`; a fan-out consumer is deleted."""
        async with self._patterns.hold(topic):
            for key in await self.local.remove(topic, handler):
                consumer = self._consumers.pop(key, None)
                if consumer is not None:
                    await consumer.stop(delete=key.group is None)

    @override
    def _extra_statistics(self) -> dict[str, Any]:
        consumers = list(getattr(self, "_consumers", {}).values())
        return {
            "stream": self.stream.name,
            "replicas": self.replicas,
            "consumers": [c.name for c in consumers],
            "pulls": sum(c.pulls for c in consumers),
            "consumers_recreated": sum(c.recreated for c in consumers),
            "duplicate_publishes": self.duplicates,
            "publish_in_progress": self.in_progress,
        }
