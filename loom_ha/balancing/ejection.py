"""Outlier ejection: stop routing to an instance whose calls keep failing, for a while.

A crashed instance stays registered until its TTL expires (micro/go-micro #244); the
`Ejector` takes it out of rotation after a few failed calls, long before the registry does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from loom_ha.balancing.base import (
    Balancer,
    Clock,
    HasInstanceId,
    InstanceT,
    SnapshotCache,
    check_instances,
    positive,
)
from loom_ha.balancing.strategies import _PRUNE_SLACK, RoundRobin
from loom_ha.errors import ConfigurationError

if TYPE_CHECKING:
    from loom_ha.event import CloudEventLike

__all__ = ["Ejector", "EjectorStatistics"]

log = logging.getLogger("loom_ha.balancing")


@dataclass(frozen=True, kw_only=True)
class EjectorStatistics:
    """Counters of an `Ejector` (for tests, metrics and `loom-ha status`).

    Attributes:
        ejected: ids ejected right now, sorted.
        ejections: ejections so far.
        readmissions: ejected instances taken back after their window.
        suppressed: ejections refused because `max_ejected_fraction` was reached.
    """

    ejected: tuple[str, ...]
    ejections: int
    readmissions: int
    suppressed: int


@dataclass
class _View:
    """One offered instance list as the ejector sees it; built once per distinct list."""

    items: tuple[HasInstanceId, ...]
    ids: frozenset[str]
    version: int = -1  # of the ejected set that `remaining` was worked out for
    remaining: tuple[HasInstanceId, ...] | None = None  # None: nothing to leave out


def _view_of(items: tuple[HasInstanceId, ...]) -> _View:
    return _View(items, frozenset(i.instance_id for i in items))


@dataclass
class _Record:
    consecutive: int = 0  # failures in a row
    ejections: int = 0  # exponent of the next window; reset after a healthy spell
    until: float | None = None  # ejected until this clock() time
    readmitted: float | None = None  # clock() of the last re-admission


class Ejector:
    """Wraps any `Balancer`: ejects an instance after `consecutive_failures` failed calls.

    The k-th ejection in a row lasts ``base_ejection * 2**(k-1)`` seconds, capped at
    `max_ejection`; the instance is re-admitted when its window ends (no probe needed: the
    next failures eject it again, for longer). The exponent resets when the instance
    succeeds after being back for `max_ejection` seconds.

    At most ``floor(max_ejected_fraction * n)`` of the `n` instances offered are ever left
    out, so the ejector never empties a service: a failing instance beyond that limit stays
    in rotation (counted in `statistics().suppressed`), and if the list shrinks, the
    instances whose windows end soonest come back first.

    A choice costs O(1) on top of the inner strategy's: the list without the ejected
    instances is worked out once per instance list and ejected set (both change rarely)
    and handed to the inner strategy as the same tuple each time, so its own per-list
    structures stay built.

    Args:
        inner: the strategy choosing among instances not ejected (round robin).
        consecutive_failures: failures in a row that eject an instance.
        base_ejection: first ejection window, seconds.
        max_ejection: longest window, seconds.
        max_ejected_fraction: most of the instances that may be ejected at once, in [0, 1).
        clock: time source, seconds (``time.monotonic``).
    """

    def __init__(
        self,
        inner: Balancer | None = None,
        *,
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejected_fraction: float = 0.5,
        clock: Clock = time.monotonic,
    ) -> None:
        if not isinstance(consecutive_failures, int) or consecutive_failures < 1:
            raise ConfigurationError(
                f"consecutive_failures must be an int >= 1, got {consecutive_failures!r}"
            )
        self.base_ejection = positive("base_ejection", base_ejection)
        self.max_ejection = positive("max_ejection", max_ejection)
        if self.max_ejection < self.base_ejection:
            raise ConfigurationError("max_ejection must be >= base_ejection")
        if not 0.0 <= max_ejected_fraction < 1.0:
            raise ConfigurationError(
                f"max_ejected_fraction must be in [0, 1) (never eject everyone), "
                f"got {max_ejected_fraction!r}"
            )
        self.inner: Balancer = inner if inner is not None else RoundRobin()
        self.consecutive_failures = consecutive_failures
        self.max_ejected_fraction = max_ejected_fraction
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._ejected: dict[str, float] = {}  # id -> until
        self._version = 0  # bumped whenever `_ejected` changes
        self._next_readmission = math.inf  # the earliest `until` in `_ejected`
        self._views = SnapshotCache(_view_of)
        self._offered = _view_of(())  # the last list offered
        self._ejections = self._readmissions = self._suppressed = 0

    # -- queries -------------------------------------------------------------------------------

    def allowed(self, n: int) -> int:
        """How many of `n` instances may be ejected at once."""
        # The epsilon keeps 0.3 * 10 from flooring to 2 through float rounding.
        return math.floor(self.max_ejected_fraction * n + 1e-9)

    def is_ejected(self, instance_id: str) -> bool:
        """True while `instance_id` is inside an ejection window."""
        self._readmit(self._clock())
        return instance_id in self._ejected

    def statistics(self) -> EjectorStatistics:
        """Current ejections and counters."""
        self._readmit(self._clock())
        return EjectorStatistics(
            ejected=tuple(sorted(self._ejected)),
            ejections=self._ejections,
            readmissions=self._readmissions,
            suppressed=self._suppressed,
        )

    # -- Balancer ------------------------------------------------------------------------------

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """The inner strategy's choice among the instances not ejected.

        Raises:
            NoHealthyInstanceError: `instances` is empty.
        """
        check_instances(instances, "Ejector")
        now = self._clock()
        if now >= self._next_readmission:
            self._readmit(now)
        view = self._offered = self._views.get(instances)
        if len(self._records) > 2 * len(view.items) + _PRUNE_SLACK:
            self._prune()
        if not self._ejected:
            return self.inner.choose(instances, event)
        if view.version != self._version:
            self._leave_out(view)
        if view.remaining is None:
            return self.inner.choose(instances, event)
        return self.inner.choose(cast("tuple[InstanceT, ...]", view.remaining), event)

    def started(self, instance: HasInstanceId) -> None:
        """Passed to the inner strategy."""
        self.inner.started(instance)

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Count the outcome; eject `instance` after enough failures in a row."""
        self.inner.record(instance, latency, ok)
        now = self._clock()
        self._readmit(now)
        instance_id = instance.instance_id
        rec = self._records.get(instance_id)
        if rec is None:
            rec = self._records[instance_id] = _Record()
        if ok:
            rec.consecutive = 0
            if rec.readmitted is not None and now - rec.readmitted >= self.max_ejection:
                rec.ejections, rec.readmitted = 0, None
            return
        rec.consecutive += 1
        if instance_id in self._ejected or rec.consecutive < self.consecutive_failures:
            return  # late failures of calls sent before the ejection do not extend it
        offered = self._offered.ids
        ejected_now = sum(1 for i in self._ejected if i in offered)
        if ejected_now >= self.allowed(len(offered)):
            self._suppressed += 1
            log.warning(
                "not ejecting %s after %d failures: %d of %d instances are ejected already",
                instance_id,
                rec.consecutive,
                ejected_now,
                len(offered),
            )
            return
        window = min(self.base_ejection * 2.0**rec.ejections, self.max_ejection)
        rec.ejections += 1
        rec.until = now + window
        self._ejected[instance_id] = rec.until
        self._version += 1
        self._next_readmission = min(self._next_readmission, rec.until)
        self._ejections += 1
        log.warning(
            "ejected %s for %.1f s after %d consecutive failures",
            instance_id,
            window,
            rec.consecutive,
        )

    # -- internals -----------------------------------------------------------------------------

    def _leave_out(self, view: _View) -> None:
        """Work out which instances of `view` to leave out under the current ejections."""
        present = [i for i in self._ejected if i in view.ids]
        limit = self.allowed(len(view.items))
        if len(present) > limit:
            # Fewer instances than when they were ejected: leave out only the `limit`
            # with the longest to go, so at least one instance always remains.
            present.sort(key=lambda i: (self._ejected[i], i), reverse=True)
            present = present[:limit]
        excluded = set(present)
        view.remaining = (
            tuple(i for i in view.items if i.instance_id not in excluded) if excluded else None
        )
        view.version = self._version

    def _readmit(self, now: float) -> None:
        if now < self._next_readmission:
            return  # O(1) on every choice: nothing is due
        for instance_id, until in [(i, u) for i, u in self._ejected.items() if u <= now]:
            del self._ejected[instance_id]
            rec = self._records.get(instance_id)
            if rec is not None:
                # Back since the window ended, whenever we happen to notice.
                rec.until, rec.readmitted, rec.consecutive = None, until, 0
            self._readmissions += 1
            log.info("re-admitted %s after its ejection window", instance_id)
        self._version += 1
        self._next_readmission = min(self._ejected.values(), default=math.inf)

    def _prune(self) -> None:
        # Keep history of ejected instances even while they are absent from the list.
        offered = self._offered.ids
        self._records = {
            k: v for k, v in self._records.items() if k in offered or k in self._ejected
        }

    def __repr__(self) -> str:
        return f"<Ejector {self.inner!r} ejected={sorted(self._ejected)}>"
