"""RedisPubSubTransport: Loom topics over Redis Pub/Sub (at-most-once, lowest latency).

One command pool and one listener connection per transport. Exact topics use
SUBSCRIBE, wildcard patterns the narrowest PSUBSCRIBE glob, filtered exactly by
the shared matcher. Every (P)SUBSCRIBE is confirmed by the server before
`subscribe()` returns, and re-sent after any reconnect or master switch. One refused
(an ACL without the channel) makes that `subscribe()` raise; the connection stays.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection
from typing_extensions import override

from loom_ha._handlers import Handler, SubscriptionKey
from loom_ha._tasks import wait_event
from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    LoomHAError,
    TransportError,
    UnsupportedCapabilityError,
)
from loom_ha.redis._base import Encoded, RedisTransportBase
from loom_ha.redis._connections import checkpoint
from loom_ha.redis._errors import map_redis_errors
from loom_ha.redis._roundtrip import UnconfirmedError
from loom_ha.topics import PatternKind, TopicPattern
from loom_ha.transport import Capabilities, require_usable

log = logging.getLogger("loom_ha.redis.pubsub")

Native = tuple[bool, bytes]  # (is a PSUBSCRIBE pattern, channel or glob)

_GLOB_SPECIAL = frozenset(b"*?[]\\")


def glob_escape(raw: bytes) -> bytes:
    """Escape Redis glob metacharacters so `raw` matches only itself."""
    out = bytearray()
    for byte in raw:
        if byte in _GLOB_SPECIAL:
            out.append(0x5C)  # backslash
        out.append(byte)
    return bytes(out)


def wire(text: str) -> bytes:
    """A topic (any str, lone surrogates included) as channel bytes; reversed by `unwire`."""
    return text.encode("utf-8", "surrogatepass")


def unwire(raw: bytes) -> str:
    """Channel bytes back to the topic."""
    return raw.decode("utf-8", "surrogatepass")


def native_subscription(pattern: TopicPattern, prefix: bytes) -> Native:
    """The narrowest Redis subscription covering `pattern` under the channel `prefix`."""
    fixed = wire(pattern.fixed)
    kind = pattern.kind
    if kind is PatternKind.EXACT:
        return (False, prefix + fixed)
    if kind is PatternKind.PREFIX:
        return (True, glob_escape(prefix + fixed) + b"*")
    if kind is PatternKind.SUFFIX:
        return (True, glob_escape(prefix) + b"*" + glob_escape(fixed))
    return (True, glob_escape(prefix) + b"*")


class RedisPubSubTransport(RedisTransportBase):
    """Loom topics over Redis Pub/Sub: at-most-once, fan-out only.

    Redis Pub/Sub has no competing consumers: an explicit ``group=`` raises
    `UnsupportedCapabilityError`, and groups made by the default rule
    (``node.request/<node>``) are treated as fan-out, with a warning logged once.
    Use `RedisStreamsTransport` when several instances of a node run.

    `publish()` is at-most-once and never sends an event twice: when the connection
    fails after the PUBLISH was written it is not re-sent (see `_send`);
    `publish_many()` pipelines many PUBLISHes per round trip.

    Args:
        url: ``redis://``, ``rediss://`` or ``redis+sentinel://`` (see `loom_ha.redis.url`).
        channel_prefix: prepended to every topic to form the channel name.
        health_check_interval: an idle listener PINGs after this many seconds and
            reconnects when the PONG does not come within the same time again.
        subscribe_timeout: how long `subscribe()` waits for the server's confirmation.
        **options: connection and codec options shared with `RedisStreamsTransport`.
    """

    backend = "redis-pubsub"
    capabilities = Capabilities(
        persistent=False,
        ordered=True,
        at_least_once=False,
        competing_consumers=False,
        replays_history=False,
        native_wildcards=True,
        dedup=False,
        cross_instance=True,
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        channel_prefix: str = "loom:",
        health_check_interval: float = 1.0,
        subscribe_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        if health_check_interval <= 0 or subscribe_timeout <= 0:
            raise ConfigurationError(
                "redis-pubsub: health_check_interval and subscribe_timeout must be > 0"
            )
        self.channel_prefix = wire(channel_prefix)
        self._health_interval = health_check_interval
        self._subscribe_timeout = subscribe_timeout
        self._natives: dict[Native, SubscriptionKey] = {}
        self._confirmed: dict[Native, asyncio.Event] = {}
        # What each command sent on the listener connection answers for, in sending order
        # (None: PING, UNSUBSCRIBE): Redis replies in order, so an error reply names its
        # (P)SUBSCRIBE, whose refusal `subscribe()` then raises.
        self._awaiting: deque[Native | None] = deque()
        self._refused: dict[Native, LoomHAError] = {}
        self._conn: AbstractConnection | None = None
        self._listening = False
        self._listening_started = asyncio.Event()  # set once the listener first listens
        self._send_lock = asyncio.Lock()
        self._sub_lock = asyncio.Lock()
        self._warned_groups = False
        self._last_reply = 0.0
        self.unconfirmed = 0
        self.listener_reconnects = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @override
    async def _start_mode(self) -> None:
        """Start the listener and return once it listens: connect() means CONNECTED."""
        self._listening_started.clear()
        self.local.tasks.spawn(self._listen(), name="listener")  # cancelled by local.close()
        if not await wait_event(self._listening_started, self._connect_timeout):
            raise ConnectionLostError(
                f"redis-pubsub: the listener connection did not open within "
                f"connect_timeout={self._connect_timeout}s"
            )

    @override
    async def _stop_mode(self) -> None:
        for waiter in self._confirmed.values():
            waiter.set()  # a subscribe waiting for its confirmation ends now, not at its timeout
        self._natives.clear()
        self._confirmed.clear()
        self._refused.clear()

    # -- Transport -------------------------------------------------------------------------------

    @override
    async def _send(self, batch: Sequence[Encoded]) -> None:
        """PUBLISH the batch; retried while the master is away, up to `publish_timeout`.

        At-most-once: an event is lost when nobody is subscribed at that moment, and
        it is never sent twice. Only attempts that cannot have reached Redis are
        retried; when the connection fails after the PUBLISHes were written (no reply
        in `socket_timeout`, a dropped connection) they are not re-sent: the call
        returns, the events may or may not have been delivered, and
        ``statistics().extra["unconfirmed"]`` counts them.
        """
        prefix = self.channel_prefix
        commands = [(b"PUBLISH", prefix + wire(topic), payload) for topic, payload in batch]
        what = self._describe("PUBLISH", batch)
        try:
            await self.connector.execute(
                commands, policy=self.publish_policy, what=what, resend=False
            )
        except UnconfirmedError as exc:
            self.unconfirmed += len(batch)
            log.warning(
                "redis-pubsub: %d event(s) may not have been delivered (not re-sent: "
                "Pub/Sub is at-most-once): %s",
                len(batch),
                exc,
            )
            return
        self.local.counters.published += len(batch)

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Subscribe; returns once Redis confirmed the (P)SUBSCRIBE.

        Raises:
            UnsupportedCapabilityError: `group` was given (Pub/Sub cannot compete).
            ConnectionLostError: no confirmation within `subscribe_timeout`.
            TransportError: Redis refused it (NOPERM: the ACL user lacks the channel).
        """
        require_usable(self._state, self.backend)
        if group is not None:
            raise UnsupportedCapabilityError(
                "redis-pubsub has no competing consumers (group=): use RedisStreamsTransport"
            )
        if self.local.resolve_group(topic, None) is not None and not self._warned_groups:
            self._warned_groups = True
            log.warning(
                "redis-pubsub: %r would join a competing-consumer group under the default "
                "rule; Pub/Sub delivers it to every instance instead (use redis streams "
                "mode to have one instance handle each request)",
                topic,
            )
        key, is_new = self.local.add(topic, handler, None)
        native = native_subscription(key.pattern, self.channel_prefix)
        if is_new:
            self._natives[native] = key
            self._confirmed[native] = asyncio.Event()
        try:
            confirmed = self._confirmed[native]
            if is_new:
                # Sent under the lock so it cannot interleave with the listener's restore;
                # while the listener is down the restore sends it instead.
                async with self._sub_lock:
                    if self._listening:
                        verb = "PSUBSCRIBE" if native[0] else "SUBSCRIBE"
                        await self._send_quietly(verb, native[1], answers=native)
            async with asyncio.timeout(self._subscribe_timeout):
                await confirmed.wait()
            require_usable(self._state, self.backend)  # woken by disconnect(), not confirmed
            refused = self._refused.get(native)
            if refused is not None:
                verb = "PSUBSCRIBE" if native[0] else "SUBSCRIBE"
                raise TransportError(
                    f"redis-pubsub: subscribe to {topic!r} ({verb} {unwire(native[1])!r}) "
                    f"refused: {refused}"
                ) from refused
        except BaseException as exc:
            await self.unsubscribe(topic, handler)
            if isinstance(exc, TimeoutError):
                raise ConnectionLostError(
                    f"redis-pubsub: subscribe to {topic!r} not confirmed within "
                    f"{self._subscribe_timeout}s"
                ) from None
            raise

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Drop the subscription; the native one goes when its last handler left."""
        for key in await self.local.remove(topic, handler):
            native = native_subscription(key.pattern, self.channel_prefix)
            self._natives.pop(native, None)
            self._confirmed.pop(native, None)
            self._refused.pop(native, None)
            async with self._sub_lock:
                if self._listening:
                    verb = "PUNSUBSCRIBE" if native[0] else "UNSUBSCRIBE"
                    await self._send_quietly(verb, native[1])

    # -- the listener ----------------------------------------------------------------------------

    async def _send_quietly(self, *args: bytes | str, answers: Native | None = None) -> None:
        """Send on the listener connection; a failure is the listener's to notice and repair.

        `answers`: the (P)SUBSCRIBE this command is (None for any other command).
        """
        conn = self._conn
        if conn is None:
            return
        try:
            async with self._send_lock:
                self._awaiting.append(answers)  # before sending: the reply may come first
                with map_redis_errors("redis-pubsub send"):
                    await conn.send_command(*args, check_health=False)
        except LoomHAError as exc:
            log.debug("redis-pubsub: send failed (the listener reconnects): %s", exc)

    async def _listen(self) -> None:
        """Own the listener connection: connect, restore subscriptions, read; forever.

        A broken listener connection only makes the listener connect again; the
        connector decides the master is lost when that fails (so a dropped listener
        never cuts the commands in flight on the shared command connections).
        """
        first = True
        while True:
            checkpoint()
            conn, _ = await self.connector.reconnect_policy.call(self.connector.dedicated)
            if not first:
                self.listener_reconnects += 1
            first = False
            try:
                await self._serve(conn)
            except (LoomHAError, OSError) as exc:
                log.warning("redis-pubsub: listener connection lost (reconnecting): %s", exc)
            finally:
                self._listening = False
                self._health_changed()
                self._conn = None
                await self.connector.release(conn)

    async def _serve(self, conn: AbstractConnection) -> None:
        async with self._sub_lock:  # no subscribe() may interleave with the restore
            self._conn = conn
            self._awaiting.clear()
            # One command per subscription (in one write), so a refusal names its own.
            natives = list(self._natives)
            self._awaiting.extend(natives)
            commands = [("PSUBSCRIBE" if n[0] else "SUBSCRIBE", n[1]) for n in natives]
            with map_redis_errors("redis-pubsub restore"):
                if commands:
                    packed = conn.pack_commands(commands)
                    await conn.send_packed_command(packed, check_health=False)
            self._listening = True
            self._listening_started.set()
            self._health_changed()
        await self._read(conn)

    async def _read(self, conn: AbstractConnection) -> None:
        prefix_len = len(self.channel_prefix)
        natives, local = self._natives, self.local
        loop = asyncio.get_running_loop()
        watchdog = local.tasks.spawn(self._watch(conn), name="listener-watchdog")
        try:
            while True:
                # Unbounded read: the watchdog bounds it (a per-read timeout costs a timer
                # per message and, on Python 3.11, can swallow a cancellation).
                try:
                    with map_redis_errors("redis-pubsub read"):
                        reply = await conn.read_response(timeout=math.inf)
                except ConnectionLostError:
                    raise
                except LoomHAError as exc:  # an error reply: the connection is fine
                    self._last_reply = loop.time()
                    self._refuse(exc)
                    continue
                checkpoint()
                self._last_reply = loop.time()
                self._dispatch(reply, natives, local, prefix_len)
        finally:
            await local.tasks.cancel(watchdog)

    async def _watch(self, conn: AbstractConnection) -> None:
        """PING an idle listener; close the connection when even the PONG does not come.

        A half-open connection (dapr #852) then fails the read, and the listener
        reconnects instead of waiting forever. The connection is only dropped when a
        PING has been unanswered for a whole interval: judging by idle time alone
        dropped healthy connections whose PONG came a moment after the previous tick.
        """
        loop = asyncio.get_running_loop()
        interval = self._health_interval
        tick = interval / 4
        self._last_reply = loop.time()
        pinged_at: float | None = None
        while True:
            await asyncio.sleep(tick)
            if pinged_at is not None and self._last_reply >= pinged_at:
                pinged_at = None  # answered (any reply after the PING proves the connection)
            now = loop.time()
            if pinged_at is None:
                if now - self._last_reply >= interval:
                    pinged_at = now  # before sending: a PONG read meanwhile must count
                    await self._send_quietly("PING")
            elif now - pinged_at >= interval:
                await asyncio.sleep(0)  # let the listener take a reply the loop already has
                if self._last_reply < pinged_at:
                    log.warning(
                        "redis-pubsub: PING unanswered for %.1fs: dropping the connection",
                        now - pinged_at,
                    )
                    await conn.disconnect(nowait=True)
                    return

    def _dispatch(
        self, reply: Any, natives: dict[Native, SubscriptionKey], local: Any, prefix_len: int
    ) -> None:
        kind = reply[0]
        if kind == b"message":
            key = natives.get((False, reply[1]))
            channel, data = reply[1], reply[2]
        elif kind == b"pmessage":
            key = natives.get((True, reply[1]))
            channel, data = reply[2], reply[3]
        else:
            if self._awaiting:
                self._awaiting.popleft()
            if kind in (b"subscribe", b"psubscribe"):
                waiter = self._confirmed.get((kind == b"psubscribe", reply[1]))
                if waiter is not None:
                    waiter.set()
            return
        if key is None:
            return  # unsubscribed meanwhile
        topic = unwire(channel[prefix_len:])
        event = self.decode(data, topic, f"{self.backend}:{unwire(channel)}")
        if event is not None:
            local.dispatch(key, topic, event)

    def _refuse(self, exc: LoomHAError) -> None:
        """Redis refused the oldest unanswered command: fail its subscription (never retried)."""
        native = self._awaiting.popleft() if self._awaiting else None
        waiter = self._confirmed.get(native) if native is not None else None
        if native is None or waiter is None:
            log.warning("redis-pubsub: Redis refused a command on the listener: %s", exc)
            return
        if waiter.is_set():  # confirmed once, refused on a reconnect (the ACL changed)
            log.error(
                "redis-pubsub: %r is no longer delivered: Redis refused it: %s",
                unwire(native[1]),
                exc,
            )
        self._natives.pop(native, None)  # not restored after a reconnect either
        self._refused[native] = exc
        waiter.set()

    @override
    def _healthy(self) -> bool:
        return super()._healthy() and self._listening

    @override
    def _reconnects(self) -> int:
        return super()._reconnects() + self.listener_reconnects

    @override
    def _extra(self) -> dict[str, Any]:
        return {
            "native_subscriptions": len(self._natives),
            "listening": self._listening,
            "listener_reconnects": self.listener_reconnects,
            "unconfirmed": self.unconfirmed,
        }
