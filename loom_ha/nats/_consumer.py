"""PullConsumer: one JetStream consumer feeding one subscription key, kept alive through failures.

It keeps pull requests outstanding (re-issued when they run low, after every
reconnect and when heartbeats stop: nats.py #504), recreates a deleted consumer,
runs the handlers, and acks only after they succeeded (nak with backoff, then a
dead letter once the delivery budget is spent).

Events are handled in nats-py's own task of the pull inbox, one at a time and in
order (no hand-off to a second task); a pull-keeping task sees only what concerns
the pulls: status messages, "running low", reconnects and silence.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext

from loom_ha._delivery import LocalDelivery
from loom_ha._durable import DurableDelivery
from loom_ha._handlers import SubscriptionKey
from loom_ha._state import StateListener
from loom_ha.errors import LoomHAError, NotConnectedError, SerializationError, TransportError
from loom_ha.event import EventCodec
from loom_ha.nats._errors import map_nats_errors, translate
from loom_ha.nats.connection import NatsConnection
from loom_ha.nats.options import ConsumerOptions, StreamOptions
from loom_ha.nats.subjects import SubjectCodec
from loom_ha.retry import RetryPolicy, forever
from loom_ha.transport import TransportState


class PullOwner(Protocol):
    """What a `PullConsumer` needs of its transport (`JetStreamTransport` provides it):
    the connection and JetStream context, the stream, options, codec, its `LocalDelivery`
    and the dead-letter place; the consumer never imports its transport."""

    codec: EventCodec[Any]
    local: LocalDelivery
    subjects: SubjectCodec
    stream: StreamOptions
    consumer_options: ConsumerOptions

    @property
    def backend_name(self) -> str: ...
    @property
    def connection(self) -> NatsConnection: ...
    @property
    def js(self) -> JetStreamContext: ...
    def add_state_listener(self, listener: StateListener) -> Callable[[], None]: ...
    def topic_of(self, subject: str) -> str: ...
    def consumer_config(
        self, key: SubscriptionKey, name: str, start: int | None
    ) -> ConsumerConfig: ...
    async def dead_letter(
        self, reason: str, topic: str, origin: str, attempts: int, raw: bytes, msg_id: str
    ) -> bool: ...


log = logging.getLogger("loom_ha.nats.jetstream")

_WAKE = object()  # queued on reconnect: pull requests died with the old connection
_REFILL = object()  # queued when the outstanding pulls run low
_HEARTBEAT = "100"
_FOREVER = forever(wait_max=2.0)


class PullConsumer:
    """The broker side of one subscription key of a `PullOwner`."""

    def __init__(self, owner: PullOwner, key: SubscriptionKey, name: str) -> None:
        self.owner = owner
        self.key = key
        self.name = name
        self.last_sequence: int | None = None  # last stream sequence seen: resume point
        self.pulls = 0
        self.recreated = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  # for the pull-keeping task
        self._outstanding = 0  # messages the open pull requests may still deliver
        self._refill_asked = False
        self._low_water = owner.consumer_options.batch // 2  # refill at or below this
        self._received = 0  # messages (data or status) so far: the idle check's sign of life
        # Not a dedup window (that is HATransport's): it keeps, by stream sequence, which
        # handlers of a partly failed message succeeded; touched only after a failure.
        self._delivery = DurableDelivery(
            owner.local.table,
            owner.local.counters,
            progress_limit=owner.consumer_options.max_ack_pending,
        )
        self._inbox = ""
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._remove_listener = owner.add_state_listener(self._on_state)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, retry: RetryPolicy) -> None:
        """Create (or join) the consumer and start pulling; the consumer exists on return."""
        await retry.call(lambda: self._ensure(recreate=False))
        client = self.owner.connection.client
        self._inbox = client.new_inbox()
        with map_nats_errors(what=f"consumer {self.name}"):
            self._sub = await client.subscribe(self._inbox, cb=self._on_message)
        if self.owner.local.tasks.closed:  # disconnected meanwhile: start nothing
            raise NotConnectedError(f"{self.owner.backend_name}: disconnected while subscribing")
        self._task = self.owner.local.tasks.spawn(self._run(), name=f"consumer:{self.name}")

    async def stop(self, *, delete: bool) -> None:
        """Stop pulling; with `delete`, remove the consumer from the server (best effort)."""
        self._stopped = True
        self._remove_listener()
        task, self._task = self._task, None
        if task is not None:
            await self.owner.local.tasks.cancel(task)
        sub, self._sub = self._sub, None
        if self.owner.connection.state is not TransportState.CONNECTED:
            return
        try:
            async with asyncio.timeout(2.0):
                if sub is not None:
                    with map_nats_errors(what="unsubscribe"):
                        await sub.unsubscribe()
                    # Return only once the server dropped our inbox: until then it may still
                    # hand a new event to one of our open pulls, which nobody would handle
                    # (the event came back to the group only after ack_wait, 30 s).
                    await self.owner.connection.barrier(2.0)
                if delete:
                    with map_nats_errors(what=f"delete consumer {self.name}"):
                        await self.owner.js.delete_consumer(self.owner.stream.name, self.name)
        except (LoomHAError, TimeoutError) as exc:
            log.debug("consumer %s: cleanup: %s", self.name, exc)

    def _on_state(self, state: TransportState) -> None:
        if state is TransportState.CONNECTED:
            self._queue.put_nowait(_WAKE)

    async def _ensure(self, *, recreate: bool) -> None:
        """Create the consumer if missing; a recreated one resumes after the last event seen."""
        owner = self.owner
        start = self.last_sequence + 1 if recreate and self.last_sequence is not None else None
        config = owner.consumer_config(self.key, self.name, start)
        with map_nats_errors(what=f"create consumer {self.name}"):
            try:
                await owner.js.add_consumer(owner.stream.name, config)
            except nats.js.errors.BadRequestError:
                # Exists with another config (another group member, or older options): join it.
                await owner.js.consumer_info(owner.stream.name, self.name)
        if recreate:
            self.recreated += 1
            log.warning("consumer %s was gone: recreated", self.name)

    # -- the pull loop -------------------------------------------------------------

    async def _pull(self, batch: int) -> None:
        owner = self.owner
        o = owner.consumer_options
        request = {
            "batch": batch,
            "expires": int(o.pull_expires * 1e9),
            "idle_heartbeat": int(o.heartbeat * 1e9),
        }
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{owner.stream.name}.{self.name}"
        with map_nats_errors(what="pull"):
            await owner.connection.client.publish(
                subject, json.dumps(request).encode(), reply=self._inbox
            )
        self.pulls += 1

    async def _on_message(self, msg: Msg) -> None:
        """nats-py's callback of the pull inbox: handle an event here, pass the rest on."""
        self._received += 1
        headers = msg.headers
        if headers and headers.get("Status") is not None:
            self._queue.put_nowait(msg)  # pull bookkeeping: the pull-keeping task's
            return
        self._outstanding -= 1
        if self._outstanding <= self._low_water and not self._refill_asked:
            self._refill_asked = True
            self._queue.put_nowait(_REFILL)
        try:
            await self._process(msg)
        except Exception:  # a bug of ours must not end the subscription
            log.exception("consumer %s: message not processed", self.name)
            await _settle(msg.nak(delay=self.owner.consumer_options.policy.backoff_max))

    async def _run(self) -> None:
        """Keep pull requests outstanding; notice when they died."""
        o = self.owner.consumer_options
        conn = self.owner.connection
        batch = o.batch
        idle = max(3 * o.heartbeat, o.heartbeat + 1.0)
        generation = conn.generation
        queue = self._queue
        while not self._stopped:
            if conn.state is not TransportState.CONNECTED:
                await conn.cell.wait_connected()
            if conn.generation != generation:
                generation, self._outstanding = conn.generation, 0  # died with the old socket
            if self._outstanding <= batch // 2:
                try:
                    await self._pull(batch)
                    self._outstanding += batch
                    self._refill_asked = False
                except LoomHAError as exc:
                    log.debug("consumer %s: pull failed: %s", self.name, exc)
                    await asyncio.sleep(0.1)  # reconnecting: the state wait above takes over
                    continue
            received = self._received
            try:
                async with asyncio.timeout(idle):
                    item = await queue.get()
            except TimeoutError:
                if self._received != received:
                    continue  # events are flowing: heartbeats only come when idle
                # No message and no heartbeat: the pull or the consumer is gone (nats.py #504).
                self._outstanding = 0
                await self._check_alive()
                continue
            if item is _WAKE:
                self._outstanding = 0
                continue
            if item is _REFILL:
                continue
            headers = item.headers or {}
            status = headers.get("Status", "")
            if status != _HEARTBEAT:
                await self._on_status(status, headers)

    async def _on_status(self, status: str, headers: dict[str, str]) -> None:
        """Account for an ended or refused pull request."""
        description = headers.get("Description", "")
        if status in ("408", "409") and "Nats-Pending-Messages" in headers:
            pending = int(headers["Nats-Pending-Messages"])
            self._outstanding = max(0, self._outstanding - pending)
        else:
            self._outstanding = 0
        if status == "409" and "deleted" in description.lower():
            await _FOREVER.call(lambda: self._ensure(recreate=True))
            self._outstanding = 0
            return
        if status == "503":
            # No responders: nothing serves this consumer's pull subject. Either it is
            # gone (deleted behind our back) or a clustered consumer is electing a
            # leader. Re-pulling alone would loop on 503 forever and, since 503s keep
            # the loop from going idle, the idle check would never run: check now.
            await asyncio.sleep(0.2)
            await self._check_alive()
            self._outstanding = 0
            return
        if status not in ("404", "408", "409"):
            log.warning("consumer %s: pull status %s %s", self.name, status, description)
            await asyncio.sleep(0.5)

    async def _check_alive(self) -> None:
        """After silence: make sure the consumer still exists (recreate it if not)."""
        owner = self.owner
        if owner.connection.state is not TransportState.CONNECTED:
            return
        try:
            with map_nats_errors(what="consumer info"):
                try:
                    await owner.js.consumer_info(owner.stream.name, self.name, timeout=2.0)
                except nats.js.errors.NotFoundError:
                    await self._ensure(recreate=True)
        except LoomHAError as exc:
            log.debug("consumer %s: health check: %s", self.name, exc)

    # -- one message -----------------------------------------------------------------

    async def _process(self, msg: Msg) -> None:
        owner, key = self.owner, self.key
        counters = owner.local.counters
        delivery = _delivery_of(msg.reply)
        if delivery is None:  # not a JetStream delivery (no ack reply): nothing to do
            return
        sequence, deliveries = delivery
        self.last_sequence = sequence
        if deliveries > 1:
            counters.redelivered += 1
        try:
            topic = owner.subjects.topic(msg.subject)
            event = owner.codec.decode(msg.data)
        except (SerializationError, ValueError) as exc:
            counters.malformed += 1
            reason = exc.reason if isinstance(exc, SerializationError) else str(exc)
            log.warning("consumer %s: malformed message: %s", self.name, reason)
            await self.dead_letter(msg, reason, owner.topic_of(msg.subject), 0)
            return
        if not key.pattern.matches(topic):
            counters.filtered += 1
            await _settle(msg.ack())
            return
        settle = _MsgSettlement(self, msg, topic, key.group is not None)
        await self._delivery.handle(
            key,
            topic,
            event,
            delivery=deliveries,
            ident=sequence,
            policy=owner.consumer_options.policy,
            settle=settle,
        )

    async def dead_letter(self, msg: Msg, reason: str, topic: str, attempts: int) -> None:
        """Publish a dead letter, then ack; if that fails, nak so it is tried again later."""
        owner = self.owner
        origin = f"{owner.backend_name}:{owner.stream.name}:{self.name}"
        msg_id = f"dlq:{self.name}:{msg.metadata.sequence.stream}"
        if await owner.dead_letter(reason, topic, origin, attempts, msg.data, msg_id):
            await _settle(msg.ack())
        else:
            await _settle(msg.nak(delay=owner.consumer_options.policy.backoff_max))


class _MsgSettlement:
    """A JetStream message settled as `DurableDelivery` decided: ack, nak, dead letter."""

    def __init__(self, consumer: PullConsumer, msg: Msg, topic: str, group: bool) -> None:
        self._consumer, self._msg, self._topic, self._group = consumer, msg, topic, group

    async def ack(self) -> None:
        await _settle(self._msg.ack())

    async def retry(self, delay: float) -> None:
        await _settle(self._msg.nak(delay=delay))

    async def dead_letter(self, reason: str, attempts: int) -> None:
        await self._consumer.dead_letter(self._msg, reason, self._topic, attempts)

    async def pass_on(self) -> None:
        await _settle(self._msg.nak() if self._group else self._msg.ack())


async def _settle(ack: Any) -> None:
    """Send an ack/nak; if the connection is gone the broker redelivers (deduplicated)."""
    try:
        await ack
    except Exception as exc:  # mapped only on failure: every delivery's ack takes this path
        mapped = translate(exc, what="ack")
        if not isinstance(mapped, TransportError):
            raise
        log.debug("ack not sent: %s", mapped)


def _delivery_of(reply: str | None) -> tuple[int, int] | None:
    """(stream sequence, delivery count) from a JetStream ack subject, None if it is not one.

    Only these two numbers are needed per message; nats-py's `Msg.metadata` builds two
    frozen dataclasses and a datetime for them (~3 µs of a delivery's CPU).
    """
    if not reply:
        return None
    tokens = reply.split(".")
    count = len(tokens)
    if count < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    try:
        if count == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>...
            return int(tokens[5]), int(tokens[4])
        if count >= 11:  # ...with <domain>.<account hash> after $JS.ACK (nats-py's Msg.Ack)
            return int(tokens[Msg.Ack.StreamSeq]), int(tokens[Msg.Ack.NumDelivered])
    except ValueError:
        pass
    return None
