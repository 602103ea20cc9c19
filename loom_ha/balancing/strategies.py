"""Load-spreading strategies: round robin, random, weighted random, least outstanding, P2C-EWMA.

Each is a `Balancer`; the ones that learn keep per-instance state keyed by `instance_id`.
"""

from __future__ import annotations

import math
import random
import time
from bisect import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from loom_ha.balancing.base import (
    Clock,
    HasInstanceId,
    InstanceT,
    SnapshotCache,
    check_instances,
    positive,
    weight_of,
)
from loom_ha.balancing.inflight import InFlightGroups
from loom_ha.errors import ConfigurationError

if TYPE_CHECKING:
    from loom_ha.event import CloudEventLike

__all__ = [
    "BalancerBase",
    "LeastOutstanding",
    "PowerOfTwoEWMA",
    "Random",
    "RoundRobin",
    "WeightedRandom",
]

_PRUNE_SLACK = 64
"""State of this many departed instances may linger before a choose() drops it."""

_REBASE = 300.0
"""Decay time constants after which P2C-EWMA re-anchors its running sum (exp(300) is far
from overflowing a float)."""


def _rng(rng: random.Random | None, seed: int | None) -> random.Random:
    if rng is not None and seed is not None:
        raise ConfigurationError("pass either rng= or seed=, not both")
    return rng if rng is not None else random.Random(seed)


class BalancerBase:
    """Default bookkeeping for strategies that do not learn: `started`/`record` do nothing."""

    def started(self, instance: HasInstanceId) -> None:
        """A call begins; ignored by this strategy."""

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """A call ended; ignored by this strategy."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class RoundRobin(BalancerBase):
    """Each instance in turn, in the order given (registries sort by instance id).

    Over any ``k * n`` consecutive calls with the same `n` instances, each gets exactly
    `k`. When the list changes the rotation carries on from its position.
    """

    def __init__(self, *, start: int = 0) -> None:
        self._next = start

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """The next instance in rotation."""
        check_instances(instances, "RoundRobin")
        index = self._next % len(instances)
        self._next = index + 1
        return instances[index]


class Random(BalancerBase):
    """Uniformly at random; pass `rng` (or `seed`) for reproducible runs."""

    def __init__(self, rng: random.Random | None = None, *, seed: int | None = None) -> None:
        self._rng = _rng(rng, seed)

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """A uniformly random instance."""
        check_instances(instances, "Random")
        return instances[self._rng.randrange(len(instances))]


class WeightedRandom(BalancerBase):
    """At random, each instance with probability ``weight / total weight``.

    The weight is ``meta["weight"]`` if set and valid, else the `weight` attribute
    (`ServiceInstance.weight`), else 1: see `weight_of`.
    """

    def __init__(self, rng: random.Random | None = None, *, seed: int | None = None) -> None:
        self._rng = _rng(rng, seed)
        self._cumulative = SnapshotCache(_cumulative_weights)

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """A random instance, in proportion to its weight (O(log n): bisect on prefix sums)."""
        check_instances(instances, "WeightedRandom")
        cumulative = self._cumulative.get(instances)
        # What random.choices(cum_weights=...) does, so a seed gives the same picks as before.
        point = self._rng.random() * cumulative[-1]
        return instances[bisect(cumulative, point, 0, len(cumulative) - 1)]


def _cumulative_weights(instances: Sequence[HasInstanceId]) -> list[float]:
    return list(accumulate(weight_of(i) for i in instances))


@dataclass
class _Stats:
    in_flight: int = 0
    ewma: float | None = None  # seconds; None until the first record()
    stamp: float = 0.0  # clock() of the last update of `ewma`
    calls: int = 0
    failures: int = 0


class _Learning(BalancerBase):
    """Per-instance in-flight counts and outcomes, keyed by instance id."""

    def __init__(self) -> None:
        self._stats: dict[str, _Stats] = {}

    def _get(self, instance_id: str) -> _Stats:
        stats = self._stats.get(instance_id)
        if stats is None:
            stats = self._stats[instance_id] = _Stats()
        return stats

    def _prune(self, instances: Sequence[HasInstanceId]) -> None:
        """Forget departed instances in bulk (new ids per restart); callers do it once more
        than ``2 * len(instances) + _PRUNE_SLACK`` are known."""
        keep = {i.instance_id for i in instances}
        self._stats = {k: v for k, v in self._stats.items() if k in keep}

    def _moved(self, instance_id: str, before: int, after: int) -> None:
        """The in-flight count of `instance_id` went from `before` to `after`."""

    def started(self, instance: HasInstanceId) -> None:
        """Count one more call in flight to `instance`."""
        stats = self._get(instance.instance_id)
        stats.in_flight += 1
        self._moved(instance.instance_id, stats.in_flight - 1, stats.in_flight)

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Count the end of a call to `instance` (never below zero in flight)."""
        stats = self._get(instance.instance_id)
        if stats.in_flight > 0:
            stats.in_flight -= 1
            self._moved(instance.instance_id, stats.in_flight + 1, stats.in_flight)
        stats.calls += 1
        if not ok:
            stats.failures += 1

    def in_flight(self, instance_id: str) -> int:
        """Calls started and not yet recorded for `instance_id`."""
        stats = self._stats.get(instance_id)
        return stats.in_flight if stats else 0


class LeastOutstanding(_Learning):
    """The instance with the fewest calls in flight; ties broken at random.

    Needs `started()` before and `record()` after each call (see `track()`). A slow
    instance holds its calls longer, so it accumulates in-flight calls and receives fewer
    new ones.
    """

    def __init__(self, rng: random.Random | None = None, *, seed: int | None = None) -> None:
        super().__init__()
        self._rng = _rng(rng, seed)
        self._groups = SnapshotCache(lambda items: InFlightGroups(items, self.in_flight))

    def _moved(self, instance_id: str, before: int, after: int) -> None:
        groups = self._groups.current
        if groups is not None:
            groups.move(instance_id, before, after)

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """An instance with the fewest calls in flight (O(1): the lowest group, at random)."""
        check_instances(instances, "LeastOutstanding")
        if len(self._stats) > 2 * len(instances) + _PRUNE_SLACK:
            self._prune(instances)
        fewest = self._groups.get(instances).fewest()
        if len(fewest) == 1:
            return instances[fewest[0]]
        return instances[fewest[self._rng.randrange(len(fewest))]]


class PowerOfTwoEWMA(_Learning):
    """Power of two choices: sample two instances, take the one with the lower cost.

    The cost is a peak-sensitive EWMA of latency times (in-flight + 1), after Finagle's
    "peak EWMA": a slower sample raises the estimate at once, faster samples pull it down
    with time constant `decay` (seconds of `clock`), and an estimate that gets no samples
    decays toward zero so an instance that was slow is probed again later. A failed call
    counts as at least `failure_latency` seconds (so an instance that fails fast does not
    attract traffic). An instance never measured is estimated at the mean of the others
    (or `initial_latency` when given).

    Args:
        rng: random source for sampling (or `seed`).
        clock: time source, seconds (``time.monotonic``).
        decay: EWMA time constant, seconds.
        failure_latency: latency charged for a failed call, seconds.
        initial_latency: estimate of unmeasured instances; None means the mean of the
            measured ones.
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        seed: int | None = None,
        clock: Clock = time.monotonic,
        decay: float = 10.0,
        failure_latency: float = 5.0,
        initial_latency: float | None = None,
    ) -> None:
        super().__init__()
        self._rng = _rng(rng, seed)
        self._clock = clock
        self.decay = positive("decay", decay)
        self.failure_latency = positive("failure_latency", failure_latency)
        if initial_latency is not None and not (
            math.isfinite(initial_latency) and initial_latency >= 0
        ):
            raise ConfigurationError(f"initial_latency must be >= 0, got {initial_latency!r}")
        self.initial_latency = initial_latency
        # Every estimate decays by the same factor per second, so the sum of the decayed
        # estimates is `_scaled * exp(-(now - _origin) / decay)`: the mean that unmeasured
        # instances get costs O(1) instead of a pass over every instance.
        self._origin = -math.inf  # the first record() rebases
        self._scaled = 0.0  # sum of ewma * exp((stamp - origin) / decay), measured instances
        self._measured = 0

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Count the end of a call and fold its latency into the instance's EWMA."""
        super().record(instance, latency, ok)
        stats = self._get(instance.instance_id)
        sample = max(0.0, latency) if ok else max(latency, self.failure_latency)
        now = self._clock()
        current = self._decayed(stats, now)
        if current is None:
            self._measured += 1
        else:
            self._scaled -= self._scaled_term(stats)
        if current is None or sample >= current:
            stats.ewma = sample  # peak: slowness shows at once
        else:
            w = math.exp(-max(0.0, now - stats.stamp) / self.decay)
            stats.ewma = current * w + sample * (1.0 - w)
        stats.stamp = now
        if now - self._origin > _REBASE * self.decay:
            self._rebase(now)  # keeps the exponents in range (and sheds rounding error)
        else:
            self._scaled += self._scaled_term(stats)

    def _scaled_term(self, stats: _Stats) -> float:
        return (stats.ewma or 0.0) * math.exp((stats.stamp - self._origin) / self.decay)

    def _rebase(self, now: float) -> None:
        self._origin = now
        measured = [s for s in self._stats.values() if s.ewma is not None]
        self._measured = len(measured)
        self._scaled = math.fsum(self._scaled_term(s) for s in measured)

    def _decayed(self, stats: _Stats, now: float) -> float | None:
        if stats.ewma is None:
            return None
        return stats.ewma * math.exp(-max(0.0, now - stats.stamp) / self.decay)

    def latency(self, instance_id: str) -> float | None:
        """The current latency estimate of `instance_id` in seconds (None: never measured)."""
        stats = self._stats.get(instance_id)
        return None if stats is None else self._decayed(stats, self._clock())

    def _cost(self, stats: _Stats | None, now: float) -> float:
        if stats is None:
            return self._default(now)
        if stats.ewma is None:
            estimate = self._default(now)
        else:
            estimate = stats.ewma * math.exp(-max(0.0, now - stats.stamp) / self.decay)
        return estimate * (stats.in_flight + 1)

    def _default(self, now: float) -> float:
        if self.initial_latency is not None:
            return self.initial_latency
        if not self._measured:
            return 0.0
        factor = math.exp(-max(0.0, now - self._origin) / self.decay)
        return max(0.0, self._scaled * factor / self._measured)

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """The cheaper of two distinct instances sampled at random."""
        check_instances(instances, "PowerOfTwoEWMA")
        n = len(instances)
        if len(self._stats) > 2 * n + _PRUNE_SLACK:
            self._prune(instances)
            self._rebase(self._clock())
        if n == 1:
            return instances[0]
        # Two draws of random() are uniform enough for any list size (53-bit floats) and
        # cost a third of two randrange() calls.
        draw = self._rng.random
        first = int(draw() * n)
        second = int(draw() * (n - 1))
        if second >= first:
            second += 1  # two distinct, uniformly
        now = self._clock()
        a, b = instances[first], instances[second]
        sa, sb = self._stats.get(a.instance_id), self._stats.get(b.instance_id)
        ca, cb = self._cost(sa, now), self._cost(sb, now)
        if cb < ca:
            return b
        # The in-flight count breaks ties while nothing has been measured (estimates 0).
        if cb == ca and (sb.in_flight if sb else 0) < (sa.in_flight if sa else 0):
            return b
        return a
