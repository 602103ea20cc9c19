"""Helpers for delivery tests: collect events, wait for them, report what is missing.

Waiting is event-driven (never a fixed sleep); failures list the missing and
duplicated event ids so a red test says exactly what was lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom_ha.event import CloudEvent

if TYPE_CHECKING:
    from loom_ha.transport import Transport

MARKER_TYPE = "loom_ha.testing.marker"


@dataclass
class Collector:
    """A handler that records every event it receives, in arrival order."""

    name: str = "collector"
    events: list[Any] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set on every arrival; collectors built by `collectors()` share one."""

    async def __call__(self, event: Any) -> None:
        self.events.append(event)
        self.changed.set()

    def __hash__(self) -> int:  # handlers are dict keys: identity, not contents
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    @property
    def ids(self) -> list[str]:
        """Ids of the received events, in arrival order."""
        return [e.id for e in self.events]

    async def wait_for(self, count: int, within: float = 10.0) -> list[Any]:
        """Wait until at least `count` events arrived; returns all received so far.

        Raises:
            AssertionError: fewer than `count` arrived within `within` seconds.
        """
        await self.wait_until(
            lambda: len(self.events) >= count,
            within=within,
            what=lambda: f"{self.name}: got {len(self.events)} of {count} events",
        )
        return list(self.events)

    async def wait_until(
        self, condition: Callable[[], bool], *, within: float = 10.0, what: Callable[[], str]
    ) -> None:
        """Wait until `condition()` holds, re-checking on every arrival.

        Raises:
            AssertionError: with `what()` when `within` seconds pass first.
        """
        try:
            async with asyncio.timeout(within):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what()} within {within}s") from None


def collectors(*names: str) -> list[Collector]:
    """Collectors that share one arrival signal, so a test can wait on all of them."""
    changed = asyncio.Event()
    return [Collector(name, changed=changed) for name in names]


async def publish_markers(
    publisher: Transport, topic: str, *listeners: Collector, within: float = 10.0
) -> set[str]:
    """Prove that nothing else is on its way to `listeners`, without waiting "a while".

    Publishes marker events on `topic` (which every listener is subscribed to) until each
    listener received one. A publisher's events on one topic arrive in order and each
    handler is called in arrival order, so once a listener has a marker, everything
    published before it that was going to reach that listener has reached it. With
    competing consumers each marker reaches one member, hence one marker after another.
    Returns the marker ids: leave them out of the assertions (`without_markers`).

    Raises:
        AssertionError: some listener got no marker within `within` seconds.
    """
    markers: set[str] = set()
    deadline = time.monotonic() + within
    while True:
        lacking = [c.name for c in listeners if not markers.intersection(c.ids)]
        if not lacking:
            return markers
        if time.monotonic() > deadline:
            raise AssertionError(f"no marker reached {lacking} within {within}s")
        marker = CloudEvent.create(source="/loom_ha/testing", type=MARKER_TYPE, data={})
        markers.add(marker.id)
        await publisher.publish(topic, marker)
        while not any(marker.id in c.ids for c in listeners):
            if not await _next_arrival(listeners, deadline - time.monotonic()):
                break


async def _next_arrival(listeners: Sequence[Collector], timeout: float) -> bool:
    """Wait until any of `listeners` receives an event; False when `timeout` passed first."""
    signals = list({id(c.changed): c.changed for c in listeners}.values())
    for signal in signals:
        signal.clear()  # no await since the caller's check: no arrival can be missed
    waiters = [asyncio.ensure_future(signal.wait()) for signal in signals]
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return bool(done)


def without_markers(ids: Iterable[str], markers: set[str]) -> list[str]:
    """`ids` in order, marker events left out."""
    return [i for i in ids if i not in markers]


def distinct_ids(*groups: Collector) -> set[str]:
    """Ids received by any of `groups`."""
    return {i for group in groups for i in group.ids}


@dataclass(frozen=True)
class DeliveryReport:
    """What happened to a set of sent events."""

    sent: int
    received: int
    lost: list[str]
    duplicated: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        """One line: sent / received / lost / duplicated."""
        return (
            f"sent={self.sent} received={self.received} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} unexpected={len(self.unexpected)}"
        )


def delivery_report(sent_ids: Sequence[str], received_ids: Iterable[str]) -> DeliveryReport:
    """Compare sent and received ids: lost, duplicated and unexpected ones."""
    counts = Counter(received_ids)
    sent_set = set(sent_ids)
    return DeliveryReport(
        sent=len(sent_ids),
        received=sum(counts.values()),
        lost=[i for i in sent_ids if i not in counts],
        duplicated=[i for i, n in counts.items() if n > 1],
        unexpected=[i for i in counts if i not in sent_set],
    )


def assert_all_received(
    sent_ids: Sequence[str],
    received_ids: Sequence[str],
    *,
    ordered: bool = False,
    dedupe: bool = False,
    redelivered: int | None = None,
) -> None:
    """Assert every sent id arrived exactly once (or at least once with `dedupe`).

    With `dedupe` (at-least-once delivery) an id may arrive more than once, but only
    through a redelivery the transport counted: give its `statistics().redelivered`
    as `redelivered` and every extra arrival must be one of them.
    With `ordered`, the first arrival of each id must follow the send order.
    The failure message lists missing, duplicated and unexpected ids.
    """
    report = delivery_report(sent_ids, received_ids)
    problems = []
    if report.lost:
        problems.append(f"missing {len(report.lost)}: {report.lost[:10]}")
    extra = report.received - len(set(received_ids))
    if report.duplicated and not dedupe:
        problems.append(f"duplicated {len(report.duplicated)}: {report.duplicated[:10]}")
    elif redelivered is not None and extra > redelivered:
        problems.append(
            f"{extra} duplicate arrivals but only {redelivered} counted redeliveries: "
            f"{report.duplicated[:10]}"
        )
    if report.unexpected:
        problems.append(f"unexpected {len(report.unexpected)}: {report.unexpected[:10]}")
    assert not problems, "; ".join(problems)
    if ordered:
        first_seen = list(dict.fromkeys(received_ids))
        assert first_seen == list(sent_ids), "events arrived out of publish order"
