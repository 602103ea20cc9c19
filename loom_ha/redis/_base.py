"""What both Redis transports share: connect/disconnect, codec, dead letters, statistics."""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from typing_extensions import override

from loom_ha._delivery import LocalDelivery
from loom_ha._state import CellTransport, StateCell
from loom_ha.deadletter import DEAD_LETTER_CODEC, DeadLetter
from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    FailoverExhaustedError,
    LoomHAError,
    NotConnectedError,
    SerializationError,
    TransportClosedError,
)
from loom_ha.event import DEFAULT_MAX_SIZE, CloudEvent, EventCodec
from loom_ha.redis.connection import RedisConnector
from loom_ha.redis.url import RedisSettings, settings_from
from loom_ha.retry import ONCE, within
from loom_ha.topics import validate_topic
from loom_ha.transport import (
    GroupRule,
    TransportState,
    TransportStatistics,
    loom_request_groups,
    require_connected,
    require_usable,
)

log = logging.getLogger("loom_ha.redis")

DEAD_LETTER_STREAM = "loom:deadletter"
# Dead letters are kept like events, but bounded so a poison flood cannot fill memory.
DEAD_LETTER_MAXLEN = 100_000
# Commands per round trip of `publish_many` (bounds the reply backlog and one retry's size).
PIPELINE_BATCH = 512

Encoded = tuple[str, bytes]  # (topic, the event's wire bytes)


class RedisLifecycle(CellTransport):
    """`connect()` of a Redis transport: one mode (`RedisTransportBase`), or the modes of a
    `RedisTransport` on one connector."""

    backend: ClassVar[str]
    _state_lock: asyncio.Lock
    _connector: RedisConnector | None

    @property
    def connector(self) -> RedisConnector:
        """The live connector (only while connected)."""
        if self._connector is None:  # disconnected (or closed) by another task meanwhile
            require_connected(self.state, self.backend)
            raise NotConnectedError(f"{self.backend}: not connected")
        return self._connector

    @override
    async def connect(self) -> None:
        """Connect to the master (found through Sentinel if configured); idempotent.

        Raises:
            ConnectionLostError: no master answered within `connect_timeout` (transient).
            TransportError: credentials refused.
        """
        if self._connected():
            return
        async with self._state_lock:
            if self._connected():  # another task connected while we waited
                return
            if self._state is TransportState.CLOSED:
                raise TransportClosedError(f"{self.backend} transport is closed")
            self._cell.set(TransportState.CONNECTING)
            try:
                await self._start()
            except BaseException:
                self._cell.set(TransportState.DISCONNECTED)
                raise

    @abstractmethod
    async def _start(self) -> None:
        """Find the master and start on it (inside `connect()`, state CONNECTING)."""

    def _connected(self) -> bool:
        """Connected, or reconnecting by itself (connect() has nothing to do)."""
        return self._state in (TransportState.CONNECTED, TransportState.RECONNECTING)


class RedisTransportBase(RedisLifecycle):
    """Connection lifecycle and the client-side half shared by the Pub/Sub and Streams modes."""

    def __init__(
        self,
        url: str | None = None,
        *,
        sentinels: Sequence[tuple[str, int]] | None = None,
        master_name: str | None = None,
        username: str | None = None,
        password: str | None = None,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        pool_size: int | None = None,
        socket_timeout: float | None = None,
        probe_interval: float | None = None,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
        event_class: type[Any] = CloudEvent,
        max_event_size: int = DEFAULT_MAX_SIZE,
        dead_letter_stream: str = DEAD_LETTER_STREAM,
        group_rule: GroupRule | None = loom_request_groups,
    ) -> None:
        self.settings: RedisSettings = settings_from(
            url,
            sentinels=sentinels,
            master_name=master_name,
            username=username,
            password=password,
            sentinel_username=sentinel_username,
            sentinel_password=sentinel_password,
            ssl_ca_certs=ssl_ca_certs,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            pool_size=pool_size,
            socket_timeout=socket_timeout,
            probe_interval=probe_interval,
        )
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("publish_timeout", publish_timeout),
        ):
            if value <= 0:
                raise ConfigurationError(f"{self.backend}: {name} must be > 0, got {value}")
        if not dead_letter_stream:
            raise ConfigurationError(f"{self.backend}: dead_letter_stream must not be empty")
        self.codec: EventCodec[Any] = EventCodec(event_class, max_size=max_event_size)
        self.dead_letter_stream = dead_letter_stream
        self._connect_timeout = connect_timeout
        self.publish_policy = within(publish_timeout)
        self._cell = StateCell(f"loom_ha.{self.backend}")
        self._state_lock = asyncio.Lock()
        self.local = LocalDelivery(f"loom_ha.{self.backend}", group_rule)
        self._connector: RedisConnector | None = None
        self._unwatch: Callable[[], None] | None = None  # removes our connector health listener

    def _health_changed(self, _: bool = True) -> None:
        """Announce CONNECTED <-> RECONNECTING when the master or this mode's own connection
        (Pub/Sub's listener) went away or came back."""
        state = self._cell.state
        if state is TransportState.CONNECTED and not self._healthy():
            self._cell.set(TransportState.RECONNECTING)
        elif state is TransportState.RECONNECTING and self._healthy():
            self._cell.set(TransportState.CONNECTED)

    # -- lifecycle -------------------------------------------------------------------------------

    @override
    async def _start(self) -> None:
        await start_modes([self])  # a single mode owns the connector it runs on

    @override
    async def disconnect(self) -> None:
        """Stop readers, drop subscriptions, close every socket; finishes even when cancelled."""
        connector = self._connector
        try:
            await self._detach()
        finally:
            if connector is not None:
                await connector.close()

    # -- running on a connector (RedisTransport shares one between its modes) ---------------------

    @property
    def longest_block(self) -> float:
        """The longest ``BLOCK`` this mode's reads ask for, seconds (0: it never blocks)."""
        return 0.0

    def _new_connector(self, *, longest_block: float) -> RedisConnector:
        """A connector for these settings (not started)."""
        owner = f"loom_ha.{self.backend}"
        return RedisConnector(self.settings, owner=owner, longest_block=longest_block)

    async def _attach(self, connector: RedisConnector) -> None:
        """Start this mode on a started `connector` that the caller owns (and closes)."""
        self._cell.set(TransportState.CONNECTING)
        self.local.reopen()
        self._connector = connector
        try:
            await self._start_mode()
        except BaseException:
            self._cell.set(TransportState.DISCONNECTED)
            try:
                await self._stop_mode()
                await self.local.close()
            finally:
                self._connector = None
            raise
        self._cell.set(TransportState.CONNECTED)
        self._unwatch = connector.add_health_listener(self._health_changed)
        self._health_changed()  # lost again meanwhile?

    async def _detach(self) -> None:
        """Stop this mode and forget its connector without closing it; idempotent.

        Finishes even when cancelled (the cancellation is re-raised afterwards).
        """
        if self._state in (TransportState.NEW, TransportState.DISCONNECTED, TransportState.CLOSED):
            return
        self._cell.set(TransportState.DISCONNECTED)
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        try:
            await self._stop_mode()
            await self.local.close()  # readers stop while the connector still exists
        finally:
            self._connector = None

    async def _start_mode(self) -> None:
        """Start mode-specific background work (called inside connect())."""

    @abstractmethod
    async def _stop_mode(self) -> None:
        """Stop mode-specific background work and forget subscriptions (idempotent)."""

    # -- publishing --------------------------------------------------------------------------------

    @override
    async def publish(self, topic: str, event: Any) -> None:
        """Send `event` in one round trip, retried while the master is away.

        Streams: returns once Redis (with Sentinel: also `wait_replicas` replicas)
        stored it; a retry after a lost reply may store it twice (counted in
        ``extra["resent"]``). Pub/Sub: at-most-once and never sent twice; a PUBLISH
        whose reply was lost returns quietly and counts in ``extra["unconfirmed"]``.

        Raises:
            FailoverExhaustedError: no master took it within `publish_timeout`.
        """
        require_usable(self._state, self.backend)
        await self._send((self.encoded(topic, event),))

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Publish `(topic, event)` pairs pipelined and in order, `PIPELINE_BATCH` per round trip.

        Each event gets `publish()`'s promise; a batch is sent, confirmed or retried as a
        whole, so one round trip serves hundreds of events instead of one.

        Raises:
            ConfigurationError / SerializationError: an item's topic or event is bad;
                the items before it were published, it and the ones after were not.
            FailoverExhaustedError: as `publish()`, for the batch being sent.
        """
        require_usable(self._state, self.backend)
        batch: list[Encoded] = []
        for topic, event in items:
            try:
                batch.append(self.encoded(topic, event))
            except LoomHAError:
                if batch:  # the items before the bad one are published, as one by one would
                    await self._send(batch)
                raise
            if len(batch) == PIPELINE_BATCH:
                await self._send(batch)
                batch = []
        if batch:
            await self._send(batch)

    def encoded(self, topic: str, event: Any) -> Encoded:
        """`(topic, wire bytes)` of one item, checked.

        Raises:
            ConfigurationError: `topic` is not a valid topic.
            SerializationError: `event` cannot be encoded.
        """
        validate_topic(topic)
        return (topic, self.codec.encode(event))

    async def send_encoded(self, batch: Sequence[Encoded]) -> None:
        """Send encoded items in order, `PIPELINE_BATCH` per round trip."""
        for start in range(0, len(batch), PIPELINE_BATCH):
            await self._send(batch[start : start + PIPELINE_BATCH])

    @staticmethod
    def _describe(verb: str, batch: Sequence[Encoded]) -> str:
        """What a round trip does, for error messages: ``XADD 'a/b' (+511 more)``."""
        more = f" (+{len(batch) - 1} more)" if len(batch) > 1 else ""
        return f"{verb} {batch[0][0]!r}{more}"

    @abstractmethod
    async def _send(self, batch: Sequence[Encoded]) -> None:
        """Send encoded events in one round trip, with this mode's delivery promise."""

    # -- shared helpers --------------------------------------------------------------------------

    def decode(self, raw: bytes | None, topic: str, origin: str) -> Any | None:
        """The event in `raw`, or None after counting it malformed and dead-lettering it."""
        try:
            if raw is None:
                raise SerializationError("no 'event' field in the stream entry")
            return self.codec.decode(raw)
        except SerializationError as exc:
            self.local.counters.malformed += 1
            log.warning("%s: malformed message on %r: %s", self.backend, topic, exc.reason)
            letter = DeadLetter(
                reason=exc.reason, topic=topic, origin=origin, attempts=0, raw=raw or b""
            )
            self.local.tasks.spawn(self._dead_letter_quietly(letter), name="dead-letter")
            return None

    async def dead_letter(self, letter: DeadLetter) -> None:
        """Append `letter` to the dead-letter stream (retrying within the publish timeout)."""
        encoded = DEAD_LETTER_CODEC.encode(letter.to_event(source=f"/loom_ha/{self.backend}"))
        fields: dict[Any, Any] = {b"event": encoded, b"topic": letter.topic.encode()}
        stream = self.dead_letter_stream

        async def append(client: Any) -> Any:
            return await client.xadd(stream, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)

        await self.connector.run(append, policy=self.publish_policy, what="dead letter")
        self.local.counters.dead_lettered += 1

    async def _dead_letter_quietly(self, letter: DeadLetter) -> None:
        try:
            await self.dead_letter(letter)
        except LoomHAError as exc:
            log.error("%s: cannot dead-letter from %r: %s", self.backend, letter.topic, exc)

    @override
    async def ping(self) -> None:
        """PING the master once; a lost master is found again (Sentinel asked) on the way.

        Raises:
            ConnectionLostError: no master answers right now.
            NotConnectedError: `connect()` was never called.
        """
        require_usable(self._state, self.backend)
        once = ONCE

        async def ping(client: Any) -> Any:
            return await client.ping()

        try:
            await self.connector.run(ping, policy=once, what="PING")
        except FailoverExhaustedError as exc:
            raise ConnectionLostError(f"{self.backend}: no master answers: {exc}") from exc

    @override
    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        if not self.capabilities.competing_consumers:  # Pub/Sub: every subscriber gets it
            return None
        return self.local.resolve_group(pattern, group)

    def _healthy(self) -> bool:
        return self._connector is not None and self._connector.healthy

    def _reconnects(self) -> int:
        """Connections re-established after the first (the master's; modes add their own)."""
        return self._connector.reconnects if self._connector else 0

    def _extra(self) -> dict[str, Any]:
        return {}

    @override
    def statistics(self) -> TransportStatistics:
        """State (see `state`), endpoint, counters."""
        state = self._state
        connector = self._connector
        return self.local.statistics(
            self.backend,
            state,
            endpoint=connector.endpoint if connector else None,
            reconnects=self._reconnects(),
            extra=self._extra(),
        )


async def start_modes(modes: Sequence[RedisTransportBase]) -> RedisConnector:
    """Find the master once (with the first mode's settings) and start every mode on it.

    On any failure the modes started so far are detached (one that failed to start
    cleaned up itself) and the connector is closed before re-raising.
    """
    first = modes[0]
    connector = first._new_connector(longest_block=max(m.longest_block for m in modes))
    started: list[RedisTransportBase] = []
    try:
        await connector.start(timeout=first._connect_timeout)
        for mode in modes:
            await mode._attach(connector)
            started.append(mode)
    except BaseException:
        try:
            await detach_modes(started)
        finally:
            await connector.close()
        raise
    return connector


async def detach_modes(modes: Sequence[RedisTransportBase]) -> None:
    """Detach every mode, even when one of them is cancelled; re-raise the first error."""
    errors: list[BaseException] = []
    for mode in modes:
        try:
            await mode._detach()
        except BaseException as exc:  # re-raised below, after the other modes stopped
            errors.append(exc)
    if errors:
        raise errors[0]
