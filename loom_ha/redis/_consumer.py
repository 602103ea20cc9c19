"""StreamConsumer: one subscription key's reader in streams mode: read, handle, ack, retry, reclaim.

Fan-out keys read with XREAD from a cursor fixed at subscribe time (no history,
nothing missed across reconnects). Group keys read with XREADGROUP, ack only
after every handler succeeded, retry a failing handler with the DeliveryPolicy
backoff (re-claiming the entry so the broker's delivery counter counts it),
sweep entries idle members left behind with XAUTOCLAIM, and dead-letter an entry
once its attempts are used up. A lost consumer group (NOGROUP: Redis restarted
empty) is recreated from the stream's start and reported. Stopping wakes a
blocked read rather than cancelling it (`loom_ha.redis._wakeable`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loom_ha._durable import DurableDelivery
from loom_ha._handlers import SubscriptionKey
from loom_ha.deadletter import DeadLetter
from loom_ha.errors import LoomHAError, NotConnectedError, TransportError
from loom_ha.redis._connections import checkpoint, text
from loom_ha.redis._errors import group_gone
from loom_ha.redis._owner import StreamsOwner
from loom_ha.redis._wakeable import WakeableReader

log = logging.getLogger("loom_ha.redis.streams")

MAX_SEQUENCE = 2**64 - 1
_PAST_THE_END = f"{MAX_SEQUENCE}-{MAX_SEQUENCE - 1}"  # reads nothing (all-max means ">")
PROGRESS_LIMIT = 4096
"""Entries per consumer whose partial progress (some handlers done) is remembered."""


class _EntrySettlement:
    """A stream entry settled as `DurableDelivery` decided: ack, retry here, dead letter."""

    def __init__(
        self,
        consumer: StreamConsumer,
        stream: bytes,
        entry_id: bytes,
        topic: str,
        origin: str,
        raw: bytes,
    ) -> None:
        self.consumer, self.stream, self.entry_id = consumer, stream, entry_id
        self.topic, self.origin, self.raw = topic, origin, raw
        self.retry_in: float | None = None  # set by retry(): the consumer delivers it again

    async def ack(self) -> None:
        self.consumer._ack(self.stream, self.entry_id)

    async def retry(self, delay: float) -> None:
        self.retry_in = delay

    async def dead_letter(self, reason: str, attempts: int) -> None:
        letter = DeadLetter(
            reason=reason, topic=self.topic, origin=self.origin, attempts=attempts, raw=self.raw
        )
        await self.consumer.t.dead_letter(letter)
        await self.ack()

    async def pass_on(self) -> None:
        """A group entry stays pending: another member reclaims it after `claim_idle`."""
        if self.consumer.group is None:
            await self.ack()


class StreamConsumer:
    """Reads the streams of one subscription key and delivers them to its handlers."""

    def __init__(self, transport: StreamsOwner, key: SubscriptionKey) -> None:
        self.t = transport
        self.key = key
        self.group = key.group
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()
        self._cursors: dict[bytes, str] = {}  # stream -> last id read (fan-out) or ">" (group)
        self._start_id = "0-0"
        self._inflight: set[tuple[bytes, bytes]] = set()
        self._acks: dict[bytes, list[bytes]] = {}
        self._generation = -1  # the connector's, when this reader last took its own entries
        self._reader = WakeableReader()
        self._delivery = DurableDelivery(
            transport.local.table, transport.local.counters, progress_limit=PROGRESS_LIMIT
        )

    @property
    def in_flight(self) -> int:
        """Entries being retried (not yet acknowledged)."""
        return len(self._inflight)

    # -- lifecycle -------------------------------------------------------------------------------

    async def ready(self) -> None:
        """Fix the start position in Redis (once), then start reading."""
        if self._task is not None:
            return
        async with self._lock:
            if self._task is not None:
                return
            await self._prepare()
            if self.t.local.tasks.closed:  # disconnected meanwhile: start nothing
                raise NotConnectedError(f"{self.t.backend}: disconnected while subscribing")
            self._task = self.t.local.tasks.spawn(self._run(), name=f"consumer:{self.key.raw}")

    async def stop(self) -> None:
        """Stop reading and retrying; unacknowledged group entries stay pending for others.

        Nothing is handled once this returns; a blocked read is woken, not cancelled, so
        its connection goes back to the pool (subscribe/unsubscribe churn opens none).
        """
        self._reader.stopping = True
        retries, task = [*self._retries], self._task
        self._retries.clear()
        self._task = None
        for retry in retries:
            await self.t.local.tasks.cancel(retry)
        if task is not None:
            await self._reader.stop(
                task, self.t.connector, longest_read=self.t.block, cancel=self.t.local.tasks.cancel
            )

    async def _prepare(self) -> None:
        seconds, micros = await self._call(lambda c: c.time(), "TIME")
        millis = int(seconds) * 1000 + int(micros) // 1000
        # Everything appended from this millisecond on (XREAD returns ids > the cursor).
        self._start_id = f"{millis - 1}-{MAX_SEQUENCE}"
        if self.key.pattern.is_wildcard:
            await self._discover(force=True, initial=True)
        else:
            await self._add_stream(self.t.stream_key(self.key.pattern.fixed), initial=True)

    async def _add_stream(self, stream: bytes, *, initial: bool = False) -> None:
        """Start reading `stream`: at its end if it existed when we subscribed, else from then.

        Streams a wildcard finds later start where the subscription started, so
        nothing published in between is skipped.
        """
        if self.group is not None:
            await self._create_group(stream, "$" if initial else self._start_id)
            if initial:
                await self._check_access(stream)
            self._cursors[stream] = ">"
            return
        last = await self._check_access(stream) if initial else None
        self._cursors[stream] = text(last[0][0]) if last else self._start_id

    async def _check_access(self, stream: bytes) -> Any:
        """Run what the loop will run, on nothing, before subscribe returns: a user without
        XREAD, XREADGROUP or XACK fails the subscribe once, the command named (the loop could
        only log it every second). A fan-out gets its start (XREVRANGE) in the same trip."""
        group, consumer = self.group, self.t.consumer_name

        async def check(client: Any) -> Any:
            async with client.pipeline(transaction=False) as pipe:
                if group is None:
                    pipe.xrevrange(stream, count=1)
                    pipe.xread({stream: _PAST_THE_END}, count=1)
                else:
                    pipe.xreadgroup(group, consumer, {stream: _PAST_THE_END}, count=1)
                    pipe.xack(stream, group, "0-0")
                replies = await pipe.execute()
            return replies[0]

        return await self._call(check, "subscribe")

    async def _create_group(self, stream: bytes, start: str) -> bool:
        group = self.group
        assert group is not None

        async def create(client: Any) -> Any:
            return await client.xgroup_create(stream, group, id=start, mkstream=True)

        try:
            await self._call(create, "XGROUP CREATE")
        except TransportError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def _discover(self, *, force: bool = False, initial: bool = False) -> None:
        for stream in await self.t.known_streams(fresh=force):
            if stream not in self._cursors and self.key.pattern.matches(self.t.topic_of(stream)):
                await self._add_stream(stream, initial=initial)

    async def _call(self, operation: Any, what: str, *, blocking: bool = False) -> Any:
        """Run a command on the master, waiting through failovers (never gives up)."""
        connector = self.t.connector
        return await connector.run(
            operation, policy=connector.reconnect_policy, what=what, blocking=blocking
        )

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        t = self.t
        wildcard = self.key.pattern.is_wildcard
        next_discovery = time.monotonic() + t.discovery_interval
        next_claim = time.monotonic() + t.claim_interval
        try:
            await self._loop(wildcard, next_discovery, next_claim)
        finally:
            await self._reader.release()

    async def _loop(self, wildcard: bool, next_discovery: float, next_claim: float) -> None:
        t, reader = self.t, self._reader
        while not reader.stopping:
            checkpoint()
            try:
                now = time.monotonic()
                if wildcard and now >= next_discovery:
                    await self._discover()
                    next_discovery = now + t.discovery_interval
                if self.group is not None and now >= next_claim:
                    await self._reclaim()
                    next_claim = now + t.claim_interval
                if self.group is not None and self._generation != t.connector.generation:
                    self._generation = t.connector.generation  # a new master or connection
                    await self._redeliver_own()
                if not self._cursors:  # a wildcard with no matching stream yet
                    await reader.parked(asyncio.sleep(t.discovery_interval))
                    continue
                reply = await self._read(wildcard)
                if reader.stopping:
                    return  # woken by stop(): what it read stays pending (group) or unread
                for stream, entries in reply or ():
                    for entry_id, fields in entries:
                        checkpoint()
                        await self._handle(stream, entry_id, fields, deliveries=1)
                        if self.group is None:
                            self._cursors[stream] = text(entry_id)
                await self._flush_acks()
            except TransportError as exc:
                if self.group is not None and group_gone(exc):
                    await self._recreate_groups()
                    continue
                log.error("redis-streams consumer %r: %s", self.key.raw, exc)
                await reader.parked(asyncio.sleep(1.0))  # a non-transient error: do not spin

    async def _read(self, wildcard: bool) -> Any:
        t = self.t
        block = int(min(t.block, t.discovery_interval) * 1000 if wildcard else t.block * 1000)
        cursors: dict[Any, Any] = dict(self._cursors)
        read = self._reader.read
        if self.group is None:
            return await self._call(
                lambda c: read(c, lambda r: r.xread(cursors, count=t.batch, block=block)),
                "XREAD",
                blocking=True,
            )
        group, consumer = self.group, t.consumer_name
        return await self._call(
            lambda c: read(
                c, lambda r: r.xreadgroup(group, consumer, cursors, count=t.batch, block=block)
            ),
            "XREADGROUP",
            blocking=True,
        )

    async def _recreate_groups(self) -> None:
        """NOGROUP: Redis lost the group (restarted without persistence?): recreate and report."""
        for stream in list(self._cursors):
            if await self._create_group(stream, "0"):
                self.t.groups_recreated += 1
                log.warning(
                    "redis-streams: consumer group %r of %r was gone (Redis restarted without "
                    "persistence?); recreated from the stream's start: events appended before "
                    "the loss and not yet delivered are lost",
                    self.group,
                    self.t.topic_of(stream),
                )

    # -- one entry -------------------------------------------------------------------------------

    async def _handle(
        self, stream: bytes, entry_id: bytes, fields: dict[bytes, bytes] | None, *, deliveries: int
    ) -> None:
        t = self.t
        if self._reader.stopping or (stream, entry_id) in self._inflight:
            return  # unsubscribed (left pending for the group), or being retried already
        topic = t.topic_of(stream)
        origin = f"{t.backend}:{topic}:{self.group or '(fan-out)'}:{t.consumer_name}"
        if not fields:
            t.trimmed += 1
            self._ack(stream, entry_id)
            return
        raw = fields.get(b"event")
        event = t.decode(raw, topic, origin)
        if event is None:
            self._ack(stream, entry_id)
            return
        settle = _EntrySettlement(self, stream, entry_id, topic, origin, raw or b"")
        await self._deliver(settle, event, deliveries, around=self._reader.parked)
        if settle.retry_in is not None:
            self._inflight.add((stream, entry_id))
            task = t.local.tasks.spawn(
                self._retry(settle, event, deliveries), name=f"retry:{self.key.raw}"
            )
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _deliver(
        self,
        settle: _EntrySettlement,
        event: Any,
        deliveries: int,
        around: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ) -> None:
        settle.retry_in = None
        await self._delivery.handle(
            self.key,
            settle.topic,
            event,
            delivery=deliveries,
            ident=(settle.stream, settle.entry_id),
            policy=self.t.policy,
            settle=settle,
            around=around,
        )

    async def _retry(self, settle: _EntrySettlement, event: Any, deliveries: int) -> None:
        """Deliver the entry again after each backoff the pipeline asks for, keeping it ours
        (the broker's delivery counter counts every attempt), until it is settled."""
        try:
            while settle.retry_in is not None:
                await asyncio.sleep(settle.retry_in)
                checkpoint()
                deliveries += 1
                if self.group is not None and not await self._claim(
                    settle.stream, settle.entry_id, deliveries
                ):
                    return  # acknowledged or taken over meanwhile: not ours anymore
                self.t.local.counters.redelivered += 1
                await self._deliver(settle, event, deliveries)
            await self._flush_acks()
        finally:
            self._inflight.discard((settle.stream, settle.entry_id))

    async def _claim(self, stream: bytes, entry_id: bytes, count: int) -> bool:
        """Keep the entry ours and make the broker's delivery counter say `count`."""
        group, consumer = self.group, self.t.consumer_name

        async def claim(client: Any) -> Any:
            return await client.xclaim(
                stream, group, consumer, 0, [entry_id], retrycount=count, justid=True
            )

        return bool(await self._call(claim, "XCLAIM"))

    # -- acks and reclaiming -----------------------------------------------------------------------

    def _ack(self, stream: bytes, entry_id: bytes) -> None:
        if self.group is not None:
            self._acks.setdefault(stream, []).append(entry_id)

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for stream, ids in acks.items():
            await self._xack(stream, ids)

    async def _xack(self, stream: bytes, ids: list[bytes]) -> None:
        group = self.group
        assert group is not None
        try:
            await self.t.connector.run(
                lambda c: c.xack(stream, group, *ids), policy=self.t.publish_policy, what="XACK"
            )
        except LoomHAError as exc:  # not acknowledged: redelivered later (at-least-once)
            log.warning("redis-streams: XACK of %d entries failed: %s", len(ids), exc)

    async def _reclaim(self) -> None:
        """Take over entries other (dead or stalled) members left pending for too long."""
        t = self.t
        group, consumer = self.group, t.consumer_name
        idle_ms = int(t.claim_idle * 1000)
        for stream in list(self._cursors):
            start: Any = "0-0"
            while True:

                async def sweep(client: Any, start: Any = start, stream: bytes = stream) -> Any:
                    return await client.xautoclaim(
                        stream, group, consumer, idle_ms, start_id=start, count=t.batch
                    )

                next_start, entries, *rest = await self._call(sweep, "XAUTOCLAIM")
                t.trimmed += len(rest[0]) if rest else 0
                counts = await self._delivery_counts(stream, entries)
                for entry_id, fields in entries:
                    if (stream, entry_id) in self._inflight:
                        continue
                    t.local.counters.redelivered += 1
                    await self._handle(stream, entry_id, fields, deliveries=counts.get(entry_id, 2))
                await self._flush_acks()
                if text(next_start) == "0-0":
                    break
                start = next_start

    async def _redeliver_own(self) -> None:
        """Handle the entries read under our name and never acknowledged, at once rather
        than after `claim_idle`: a read whose reply was lost with a killed master (the new
        one has it pending for us), entries left when our connection broke."""
        group, consumer, batch = self.group, self.t.consumer_name, self.t.batch
        cursors: dict[Any, Any] = dict.fromkeys(self._cursors, "0")
        while cursors:

            async def pending(client: Any, cursors: dict[Any, Any] = cursors) -> Any:
                return await client.xreadgroup(group, consumer, cursors, count=batch)

            reply, cursors = await self._call(pending, "XREADGROUP"), {}
            for stream, entries in reply or ():
                counts = await self._delivery_counts(stream, entries)
                for entry_id, fields in entries:
                    await self._handle(stream, entry_id, fields, deliveries=counts.get(entry_id, 1))
                if len(entries) == batch:  # maybe more: go on after the last one
                    cursors[stream] = entries[-1][0]
            await self._flush_acks()

    async def _delivery_counts(self, stream: bytes, entries: list[Any]) -> dict[bytes, int]:
        if not entries:
            return {}
        group, consumer = self.group, self.t.consumer_name
        first, last = entries[0][0], entries[-1][0]

        async def pending(client: Any) -> Any:
            return await client.xpending_range(
                stream, group, min=first, max=last, count=len(entries), consumername=consumer
            )

        rows = await self._call(pending, "XPENDING")
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}
