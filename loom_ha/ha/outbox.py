"""The bounded outbox: publishes that wait while the broker is away.

Entries keep the very event object that was published, so a replay carries the
same CloudEvent id and a durable broker (JetStream's Msg-Id window, loom-ha's
dedup window) can drop a copy that did get through before the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loom_ha.errors import ConfigurationError, ConnectionLostError, PublishError, TransientError


class OutboxPolicy(enum.Enum):
    """What `publish()` does while the broker is away."""

    BLOCK = "block"  # wait (up to a timeout) until the event was handed to the broker
    FAIL_FAST = "fail_fast"  # raise ConnectionLostError at once (retryable)
    DROP_OLDEST = "drop_oldest"  # queue and return; a full outbox drops its oldest (counted)


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Outbox settings of one transport (a publish may override the policy and timeout).

    Attributes:
        policy: see `OutboxPolicy`.
        max_size: events the outbox holds at most.
        timeout: seconds a BLOCK publish waits before raising `PublishError`.
    """

    policy: OutboxPolicy = OutboxPolicy.BLOCK
    max_size: int = 10_000
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ConfigurationError(f"outbox max_size must be >= 1, got {self.max_size}")
        if self.timeout <= 0:
            raise ConfigurationError(f"outbox timeout must be > 0, got {self.timeout}")


@dataclass(eq=False, slots=True)
class _Entry:
    topic: str
    event: Any
    sent: asyncio.Future[None] | None  # None: nobody waits (DROP_OLDEST)


Send = Callable[[str, Any], Awaitable[None]]


class Outbox:
    """FIFO of events waiting for the broker; drained in order after recovery."""

    def __init__(self, config: OutboxConfig) -> None:
        self.config = config
        self._entries: deque[_Entry] = deque()
        self._space_waiters: deque[asyncio.Future[None]] = deque()
        self.dropped = 0

    @property
    def depth(self) -> int:
        """Events waiting."""
        return len(self._entries)

    async def put(
        self,
        topic: str,
        event: Any,
        *,
        policy: OutboxPolicy | None = None,
        timeout: float | None = None,
    ) -> None:
        """Queue `event` according to the policy; see `OutboxPolicy` for when this returns.

        Raises:
            ConnectionLostError: FAIL_FAST.
            PublishError: BLOCK, and the event was not sent within the timeout.
        """
        policy = policy or self.config.policy
        if policy is OutboxPolicy.FAIL_FAST:
            raise ConnectionLostError(f"broker unavailable; not publishing event {event.id}")
        if policy is OutboxPolicy.DROP_OLDEST:
            if len(self._entries) >= self.config.max_size:
                oldest = self._entries.popleft()
                self.dropped += 1
                if oldest.sent is not None and not oldest.sent.done():
                    oldest.sent.set_exception(
                        PublishError("dropped from a full outbox", topic=oldest.topic)
                    )
            self._entries.append(_Entry(topic, event, None))
            return
        await self._put_and_wait(topic, event, timeout or self.config.timeout)

    async def _put_and_wait(self, topic: str, event: Any, timeout: float) -> None:
        entry = _Entry(topic, event, asyncio.get_running_loop().create_future())
        assert entry.sent is not None
        try:
            async with asyncio.timeout(timeout):
                while len(self._entries) >= self.config.max_size:
                    waiter = asyncio.get_running_loop().create_future()
                    self._space_waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        with contextlib.suppress(ValueError):
                            self._space_waiters.remove(waiter)
                self._entries.append(entry)
                await asyncio.shield(entry.sent)
        except TimeoutError:
            self._discard(entry)
            raise PublishError(
                f"broker unavailable for {timeout}s; event {event.id} not published",
                topic=topic,
                event_id=event.id,
            ) from None
        except asyncio.CancelledError:
            self._discard(entry)
            raise

    def _discard(self, entry: _Entry) -> None:
        with contextlib.suppress(ValueError):  # already sent or dropped
            self._entries.remove(entry)

    async def drain(self, send: Send) -> None:
        """Send queued events in order; on failure the unsent ones stay, in order.

        An event that fails for a non-transient reason (it cannot be encoded, say) is
        taken out and its publisher gets the error; the others go on.

        Raises:
            TransientError: the broker failed again; the head entry stays queued.
        """
        while self._entries:
            entry = self._entries[0]
            try:
                await send(entry.topic, entry.event)
            except Exception as exc:
                if isinstance(exc, TransientError):
                    raise
                # This event can never be sent (it is not the broker's fault): give its
                # publisher the error and go on with the others.
                self._finish(entry, exc)
                continue
            self._finish(entry, None)

    def _finish(self, entry: _Entry, error: Exception | None) -> None:
        if self._entries and self._entries[0] is entry:
            self._entries.popleft()
        if entry.sent is not None and not entry.sent.done():
            if error is None:
                entry.sent.set_result(None)
            else:
                entry.sent.set_exception(error)
        self._notify_space()

    def _notify_space(self) -> None:
        """Wake one BLOCK publisher waiting for room (without awaiting the lock)."""
        waiter = self._space_waiters.popleft() if self._space_waiters else None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail_all(self, error: Exception) -> None:
        """Fail every waiting publisher (the transport is closing); the outbox empties."""
        while self._entries:
            entry = self._entries.popleft()
            if entry.sent is not None and not entry.sent.done():
                entry.sent.set_exception(error)
