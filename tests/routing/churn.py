"""The record kept by tests/routing/test_churn.py and the checks run over it afterwards.

What the client chose (a `Recorder` around its balancer), what the client's directory
listed (a watch on the client's own registry), when each instance deregistered and what
each instance received. Every entry is stamped with (order, time): `order` is a counter
bumped by each entry, so it is the event loop's own order of steps (one thread); `time`
is `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from loom_ha.balancing import Balancer, HashRing, HasInstanceId, attribute_key


class Stamp(NamedTuple):
    order: int  # position in the event loop's sequence of recorded entries
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Choice:
    """One attempt of one request, as the client's balancer made it."""

    stamp: Stamp
    request: str  # the event id (every attempt of a request reuses it)
    key: str | None  # the consistent-hash key (the event's subject)
    listed: tuple[str, ...]  # the ids the router offered: its directory's list (less tried)
    ring: tuple[str, ...]  # the ids that reached the consistent hash (after the ejector)
    chosen: str
    first: bool  # the request's first attempt (retries skip instances already tried)


@dataclass
class Timeline:
    """Everything the churn test records, in loop order."""

    choices: list[Choice] = field(default_factory=list)
    deliveries: list[tuple[Stamp, str, str]] = field(default_factory=list)  # (_, instance, id)
    snapshots: list[tuple[Stamp, frozenset[str]]] = field(default_factory=list)  # the client's
    deregistered: dict[str, Stamp] = field(default_factory=dict)  # deregister() returned
    modes: dict[str, str] = field(default_factory=dict)  # how each instance left
    joins: int = 0
    requests: int = 0
    answered: int = 0
    lost: list[str] = field(default_factory=list)  # keys of calls that got no answer
    failed: list[str] = field(default_factory=list)  # errors raised to the caller
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    _ever: set[str] = field(default_factory=set)  # listed at least once
    _unlisted: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def stamp(self) -> Stamp:
        return Stamp(next(self._counter), time.monotonic())

    @property
    def listed(self) -> frozenset[str]:
        """The ids the client's directory lists now."""
        return self.snapshots[-1][1] if self.snapshots else frozenset()

    def saw(self, ids: Iterable[str]) -> None:
        """A snapshot reached the client's registry (the directory got the same one)."""
        current = frozenset(ids)
        for instance in self.listed - current:
            self.unlisted(instance).set()
        self._ever |= current
        self.snapshots.append((self.stamp(), current))
        self._changed.set()
        self._changed = asyncio.Event()

    def unlisted(self, instance: str) -> asyncio.Event:
        """Set once the client's directory stopped listing `instance` (or, at its
        deregistration, if it never listed it: a short life between two polls)."""
        return self._unlisted.setdefault(instance, asyncio.Event())

    def delivered(self, instance: str, request: str) -> None:
        self.deliveries.append((self.stamp(), instance, request))

    def left(self, instance: str, mode: str) -> None:
        self.deregistered[instance] = self.stamp()
        self.modes[instance] = mode
        if instance not in self._ever:
            self.unlisted(instance).set()

    async def changed(self) -> None:
        """Until the next snapshot reaches the client's registry."""
        await self._changed.wait()


class RingInput:
    """Passes everything to the consistent hash, remembering the ids it was last offered."""

    def __init__(self, inner: Balancer) -> None:
        self.inner = inner
        self.last: tuple[str, ...] = ()
        self._seen: Sequence[Any] | None = None

    def choose(self, instances: Sequence[Any], event: Any = None) -> Any:
        if instances is not self._seen:  # the same tuple until the list changes
            self._seen, self.last = instances, tuple(i.instance_id for i in instances)
        return self.inner.choose(instances, event)

    def started(self, instance: HasInstanceId) -> None:
        self.inner.started(instance)

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        self.inner.record(instance, latency, ok)


class Recorder(RingInput):
    """The client's balancer, logging each choice into `timeline`."""

    def __init__(self, inner: Balancer, ring: RingInput, timeline: Timeline) -> None:
        super().__init__(inner)
        self._ring = ring
        self._timeline = timeline
        self._key = attribute_key("subject")
        self._requests: set[str] = set()

    def choose(self, instances: Sequence[Any], event: Any = None) -> Any:
        chosen = super().choose(instances, event)
        request = str(event.id)
        first = request not in self._requests
        self._requests.add(request)
        key = self._key(event)
        self._timeline.choices.append(
            Choice(
                self._timeline.stamp(),
                request,
                key if isinstance(key, str) else None,
                self.last,
                self._ring.last,
                chosen.instance_id,
                first,
            )
        )
        return chosen


# -- checks -------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def staleness(timeline: Timeline) -> tuple[list[str], str]:
    """Problems and the figures of "no request to an instance gone more than one watch
    round trip ago".

    An instance is gone from the client's directory at the first snapshot after the last
    one listing it. One watch round trip of a deregistration = from `deregister()`
    returning to that snapshot (negative when the watch beat the reply). Nothing may be
    addressed to an instance once it is gone (compared in loop order), so a request
    reaching it more than one round trip after its deregistration was on the wire
    already. An instance may leave the listing only once, after its deregistration (an
    instance that left and came back, or left while registered, is a problem).
    """
    problems: list[str] = []
    spans: dict[str, list[int]] = {}
    for n, (_, ids) in enumerate(timeline.snapshots):
        for instance in ids:
            spans.setdefault(instance, []).append(n)
    gone: dict[str, Stamp] = {}
    for instance, listed in spans.items():
        if listed[-1] - listed[0] + 1 != len(listed):
            problems.append(f"{instance} left the client's directory and came back")
        if listed[-1] + 1 < len(timeline.snapshots):
            gone[instance] = timeline.snapshots[listed[-1] + 1][0]
            if instance not in timeline.deregistered:
                problems.append(f"{instance} left the client's directory while registered")
    never = timeline.deregistered.keys() - spans.keys()
    rounds: list[float] = []
    for instance, left in timeline.deregistered.items():
        if instance in gone:
            rounds.append(gone[instance].at - left.at)
        elif instance not in never:
            problems.append(f"{instance} deregistered but the client's directory still lists it")
    problems.extend(
        f"request {c.request} sent to {c.chosen} after the client's directory dropped it"
        for c in timeline.choices
        if c.chosen in never or (c.chosen in gone and c.stamp.order > gone[c.chosen].order)
    )
    late = [
        (at.at - timeline.deregistered[i].at, at.at - gone[i].at)
        for at, i, _ in timeline.deliveries
        if i in gone and at.order > timeline.deregistered[i].order
    ]
    worst = max((s for s, _ in late), default=0.0)
    beyond = max((b for _, b in late), default=0.0)
    figures = (
        f"watch round trip median {_ms(statistics.median(rounds)) if rounds else '-'}, "
        f"max {_ms(max(rounds, default=0.0))} ({len(never)} left between two snapshots); "
        f"{len(late)} deliveries after deregistration, worst staleness {_ms(worst)} "
        f"({_ms(max(beyond, 0.0))} past its round trip, already on the wire)"
    )
    return problems, figures


def ring_moves(timeline: Timeline, vnodes: int = 160) -> tuple[list[str], str]:
    """Problems and the figures of "keys move only as the ring changes".

    Every choice must equal a ring rebuilt from the ids the consistent hash was offered
    (the directory's snapshot, less instances ejected or already tried); a key's owner
    (first attempts) may change only when its owner left the ring or the new owner joined
    it since that key's previous request.
    """
    rings: dict[frozenset[str], HashRing] = {}
    problems: list[str] = []
    for c in timeline.choices:
        if c.key is None:
            problems.append(f"request {c.request} has no key")
            continue
        members = frozenset(c.ring)
        ring = rings.get(members)
        if ring is None:
            ring = rings[members] = HashRing(members, vnodes=vnodes)
        expected = ring.lookup(c.key)
        if c.chosen != expected:
            problems.append(f"key {c.key} went to {c.chosen}, the ring owner is {expected}")
        if not members <= set(c.listed):
            problems.append(f"request {c.request}: the ring had instances the directory lacked")
    last: dict[str, Choice] = {}
    moved = owner_left = newcomer = changes = 0
    previous_ring: tuple[str, ...] | None = None
    for c in timeline.choices:
        if not c.first or c.key is None:
            continue
        if previous_ring is not None and set(c.ring) != set(previous_ring):
            changes += 1
        previous_ring = c.ring
        before = last.get(c.key)
        last[c.key] = c
        if before is None or before.chosen == c.chosen:
            continue
        moved += 1
        if before.chosen not in c.ring:
            owner_left += 1
        elif c.chosen not in before.ring:
            newcomer += 1
        else:
            problems.append(f"key {c.key} moved {before.chosen} -> {c.chosen}, both on the ring")
    ejected = sum(1 for c in timeline.choices if c.first and len(c.ring) < len(c.listed))
    figures = (
        f"keys moved {moved} (owner left {owner_left}, newcomer took its segment {newcomer}) "
        f"over {changes} ring changes; {ejected} first attempts with instances ejected"
    )
    return problems, figures
