"""A paced publisher for chaos tests: numbered events, one publish call after the other, until
stopped, with what a fault did to the caller (accepted ids, errors, how long each call took,
which server it was on).

Its records are plain lists and its stop signal a `threading.Event`, so it may run in another
thread's event loop (e.g. a `loom_ha.testing.netns` member) while the test reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loom_ha.errors import TransportError
from loom_ha.event import CloudEvent
from loom_ha.transport import Transport

__all__ = ["Pacer"]


@dataclass(eq=False)
class Pacer:
    """Publishes numbered events until `stop` is set; every publish call is timed.

    A publish either returns (its id is accepted) or raises a `TransportError` (recorded in
    `errors`, not raised): that is the contract a chaos test checks. Any other exception is
    a bug and ends the run.

    Attributes:
        name: names the run; events come from source ``/chaos/<name>``.
        pace: seconds between two publish calls.
        sent: ids of the accepted events, in order.
        accepted_at: when each of `sent` returned (``time.monotonic()``).
        errors: the errors callers saw.
        calls: (began, seconds) of every publish call: the longest is the stall.
        moves: (when, endpoint) each time the transport was first seen on another server.
        stop: set to stop after the call in progress.
    """

    name: str = "pacer"
    pace: float = 0.0
    sent: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    errors: list[TransportError] = field(default_factory=list)
    calls: list[tuple[float, float]] = field(default_factory=list)
    moves: list[tuple[float, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _accepted: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def run(self, transport: Transport, topic: str) -> None:
        """Publish to `topic` until `stop` is set (then return after the call in progress)."""
        n = 0
        while not self.stop.is_set():
            event = CloudEvent.create(
                source=f"/chaos/{self.name}", type="chaos.paced", data={"n": n}
            )
            n += 1
            started = time.monotonic()
            try:
                await transport.publish(topic, event)
            except TransportError as exc:  # every publish either arrives or raises one
                self.errors.append(exc)
            else:
                self.sent.append(event.id)
                self.accepted_at.append(time.monotonic())
                self._accepted.set()
            self.calls.append((started, time.monotonic() - started))
            endpoint = transport.statistics().endpoint
            if not self.moves or self.moves[-1][1] != endpoint:
                self.moves.append((time.monotonic(), endpoint))
            await asyncio.sleep(self.pace)

    @contextlib.asynccontextmanager
    async def publishing(self, transport: Transport, topic: str) -> AsyncIterator[Pacer]:
        """`run` in a task for the block; stopped (the call in progress let finish) and
        awaited when the block ends."""
        task = asyncio.create_task(self.run(transport, topic), name=f"pacer {self.name}")
        try:
            yield self
        finally:
            self.stop.set()
            await task  # owned here: raises what ended the run, if not a TransportError

    @property
    def longest(self) -> float:
        """The longest publish call of the run, seconds."""
        return max((seconds for _, seconds in self.calls), default=0.0)

    def stall(self, since: float) -> float:
        """The longest publish call still running at or after `since`, seconds."""
        return max((d for b, d in self.calls if b + d >= since), default=0.0)

    def stall_end(self, since: float) -> float:
        """When the longest call still running at or after `since` returned."""
        began, seconds = max(
            ((b, d) for b, d in self.calls if b + d >= since),
            key=lambda call: call[1],
            default=(since, 0.0),
        )
        return began + seconds

    def longest_within(self, start: float, end: float = float("inf")) -> float:
        """The longest publish call that began and returned between `start` and `end`, s."""
        return max((d for b, d in self.calls if start <= b and b + d <= end), default=0.0)

    def accepted_between(self, start: float, end: float = float("inf")) -> list[str]:
        """Ids whose publish returned in [`start`, `end`) (``time.monotonic()`` seconds)."""
        pairs = zip(self.sent, self.accepted_at, strict=False)
        return [i for i, t in pairs if start <= t < end]

    def moved_to(self, endpoint: str, after: float) -> float | None:
        """When the transport was first seen on `endpoint` after `after`, else None."""
        return next((t for t, e in self.moves if t > after and e == endpoint), None)

    async def wait_until_sent(self, count: int, within: float) -> None:
        """Wait until `count` more events were accepted (from the loop that runs the pacer).

        Raises:
            TimeoutError: they were not within `within` seconds.
        """
        target = len(self.sent) + count
        async with asyncio.timeout(within):
            while len(self.sent) < target:
                self._accepted.clear()
                await self._accepted.wait()
