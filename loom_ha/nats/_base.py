"""What both NATS delivery modes share: lifecycle, state, statistics and dead letters.

A subclass adds the broker side of one delivery mode (native subscriptions or
JetStream consumers); this class owns the connection and `connect()`/`disconnect()`.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from typing_extensions import Unpack, override

from loom_ha._delivery import LocalDelivery
from loom_ha._tasks import finish_all
from loom_ha.deadletter import DEAD_LETTER_CODEC, DeadLetter
from loom_ha.errors import TransportClosedError
from loom_ha.event import EventCodec, loom_event_class
from loom_ha.nats.connection import (
    DEFAULT_SERVERS,
    ConnectionOptions,
    NatsConnection,
    NatsOptions,
    StateListener,
)
from loom_ha.nats.subjects import DEFAULT_DEAD_LETTER_PREFIX, DEFAULT_PREFIX, SubjectCodec
from loom_ha.transport import (
    GroupRule,
    Transport,
    TransportState,
    TransportStatistics,
    loom_request_groups,
    require_connected,
)

log = logging.getLogger("loom_ha.nats")


class PatternLocks:
    """One lock per subscription pattern, kept only while someone holds or waits for it.

    `subscribe()` and `unsubscribe()` of one pattern hold it from the handler table
    change until the broker side is done, so a subscriber joining a pattern never
    returns before its native subscription is effective, and never loses it to the
    teardown of the previous one (Loom subscribes and unsubscribes the same response
    topic around every call, often concurrently).
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, pattern: str) -> AsyncIterator[None]:
        """Hold the lock of `pattern` for the duration of the block."""
        entry = self._locks.get(pattern)
        if entry is None:
            entry = self._locks[pattern] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[pattern]


class NatsTransportBase(Transport):
    """Connection lifecycle shared by `NatsCoreTransport` and `JetStreamTransport`."""

    backend_name = "nats"

    def __init__(
        self,
        servers: Sequence[str] | str = DEFAULT_SERVERS,
        *,
        subject_prefix: str = DEFAULT_PREFIX,
        dead_letter_prefix: str = DEFAULT_DEAD_LETTER_PREFIX,
        codec: EventCodec[Any] | None = None,
        group_rule: GroupRule | None = loom_request_groups,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        self.options = NatsOptions.build(servers, **connection)
        self.subjects = SubjectCodec(subject_prefix, dead_letter_prefix)
        self.codec: EventCodec[Any] = codec or EventCodec(loom_event_class())
        self._conn = NatsConnection(self.options, self.backend_name)
        self.local = LocalDelivery(f"loom_ha.{self.backend_name}", group_rule)
        self._counters = self.local.counters
        self._lock = asyncio.Lock()
        self._closed = False  # close() was called: connect() refuses for good
        self._patterns = PatternLocks()
        self._forget_native()

    # -- lifecycle ---------------------------------------------------------------

    @override
    async def connect(self) -> None:
        """Connect (idempotent and cheap once connected or reconnecting).

        Raises:
            ConnectionLostError: no server could be reached within `connect_timeout`.
            ConfigurationError: credentials or TLS were rejected.
            TransportClosedError: the client gave up reconnecting (`max_reconnect_attempts`).
        """
        if self._conn.state in (TransportState.CONNECTED, TransportState.RECONNECTING):
            return
        async with self._lock:
            state = self._conn.state
            if state in (TransportState.CONNECTED, TransportState.RECONNECTING):
                return
            if self._closed:
                raise TransportClosedError(f"{self.backend_name} transport is closed")
            if state is TransportState.CLOSED:
                raise TransportClosedError(
                    f"{self.backend_name}: gave up reconnecting; create a new transport"
                )
            self.local.reopen()
            await self._conn.open()
            try:
                await self._after_connect()
            except BaseException:
                await self._shutdown()
                raise

    @override
    async def disconnect(self) -> None:
        """Stop every consumer, drop every subscription and close the socket.

        Idempotent; finishes (and leaves no task or socket) even when cancelled.
        """
        if self._conn.state in (TransportState.NEW, TransportState.DISCONNECTED) or self._closed:
            return
        await self._shutdown()

    @override
    def _mark_closed(self) -> None:
        self._closed = True
        self._conn.cell.set(TransportState.CLOSED)

    async def _shutdown(self) -> None:
        try:
            await finish_all(
                self._before_close,  # broker-side consumers, while the connection is up
                self.local.close,
                self._conn.close,
                self.local.settle,  # handler calls in nats-py's (now cancelled) tasks
                owner=self.backend_name,
            )
        finally:
            self._forget_native()
            self._conn.cell.set(TransportState.DISCONNECTED)

    async def _after_connect(self) -> None:
        """Hook: broker-side setup once connected (streams)."""

    async def _before_close(self) -> None:
        """Hook: stop broker-side consumers while the connection is still up."""

    @abstractmethod
    def _forget_native(self) -> None:
        """Drop references to native subscriptions (the connection is gone)."""

    # -- shared helpers ----------------------------------------------------------

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call `listener(state)` on every state change (connecting, connected,
        reconnecting, disconnected, closed); returns a function that removes it."""
        return self._conn.cell.add_listener(listener)

    @property
    def state(self) -> TransportState:
        """The current state (also in `statistics()`)."""
        return self._conn.state

    def _dead_letter_event(
        self, reason: str, topic: str, origin: str, attempts: int, raw: bytes
    ) -> tuple[str, bytes]:
        """Subject and payload of a dead letter; the original is cut to fit max_payload."""
        limit = self._conn.client.max_payload
        room = max(0, (limit - 2048 - 2 * len(reason) - 4 * len(topic)) * 3 // 4)
        if len(raw) > room:
            reason, raw = f"{reason} (original cut from {len(raw)} to {room} bytes)", raw[:room]
        letter = DeadLetter(reason=reason, topic=topic, origin=origin, attempts=attempts, raw=raw)
        return self.subjects.dead_letter_subject(topic), DEAD_LETTER_CODEC.encode(letter.to_event())

    def topic_of(self, subject: str) -> str:
        """The Loom topic of `subject`; the raw subject when it is not ours (dead letters)."""
        try:
            return self.subjects.topic(subject)
        except ValueError:
            return subject

    @override
    async def ping(self) -> None:
        """A PING/PONG round trip with the server the client is connected to.

        Raises:
            ConnectionLostError: the server does not answer (reconnecting).
            NotConnectedError: `connect()` was never called.
        """
        require_connected(self._conn.state, self.backend_name)
        await self._conn.round_trip(self.options.connect_timeout)

    @override
    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        return self.local.resolve_group(pattern, group)

    @override
    def statistics(self) -> TransportStatistics:
        conn = self._conn
        return self.local.statistics(
            self.backend_name,
            conn.state,
            endpoint=conn.endpoint,
            reconnects=conn.reconnects,
            pending=self._pending(),
            extra={
                "servers": list(self.options.servers),  # never with credentials (NatsOptions)
                "detection_time": self.options.detection_time,
                "dead_servers": conn.dead_servers,
                "last_error": conn.last_error,
                "reconnect_attempts": conn.reconnect_attempts,
                "slow_consumer_drops": conn.slow_consumer_drops,
            }
            | self._extra_statistics(),
        )

    def _extra_statistics(self) -> dict[str, Any]:
        return {}

    def _pending(self) -> int:
        """Messages nats-py received for us and holds in its subscription queues."""
        return 0
