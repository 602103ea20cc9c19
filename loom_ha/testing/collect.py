"""Helpers for delivery tests: collect events, wait for them, report what is missing.

Waiting is event-driven (never a fixed sleep); failures list the missing and
duplicated event ids so a red test says exactly what was lost.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


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
) -> None:
    """Assert every sent id arrived exactly once (or at least once with `dedupe`).

    With `ordered`, the first arrival of each id must follow the send order.
    The failure message lists missing, duplicated and unexpected ids.
    """
    report = delivery_report(sent_ids, received_ids)
    problems = []
    if report.lost:
        problems.append(f"missing {len(report.lost)}: {report.lost[:10]}")
    if report.duplicated and not dedupe:
        problems.append(f"duplicated {len(report.duplicated)}: {report.duplicated[:10]}")
    if report.unexpected:
        problems.append(f"unexpected {len(report.unexpected)}: {report.unexpected[:10]}")
    assert not problems, "; ".join(problems)
    if ordered:
        first_seen = list(dict.fromkeys(received_ids))
        assert first_seen == list(sent_ids), "events arrived out of publish order"
