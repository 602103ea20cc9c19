"""Load-spreading strategies: round robin, random, weighted random, least outstanding, P2C-EWMA.

Each is a `Balancer`; the ones that learn keep per-instance state keyed by `instance_id`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from loom_ha.balancing.base import (
    Clock,
    HasInstanceId,
    InstanceT,
    check_instances,
    positive,
    weight_of,
)
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

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """A random instance, in proportion to its weight."""
        check_instances(instances, "WeightedRandom")
        cumulative = list(accumulate(weight_of(i) for i in instances))
        return self._rng.choices(instances, cum_weights=cumulative)[0]


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
        # Instances come and go (new ids per restart): forget the departed, in bulk.
        if len(self._stats) > 2 * len(instances) + _PRUNE_SLACK:
            keep = {i.instance_id for i in instances}
            self._stats = {k: v for k, v in self._stats.items() if k in keep}

    def started(self, instance: HasInstanceId) -> None:
        """Count one more call in flight to `instance`."""
        self._get(instance.instance_id).in_flight += 1

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Count the end of a call to `instance` (never below zero in flight)."""
        stats = self._get(instance.instance_id)
        stats.in_flight = max(0, stats.in_flight - 1)
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

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """An instance with the fewest calls in flight."""
        check_instances(instances, "LeastOutstanding")
        self._prune(instances)
        best: list[InstanceT] = []
        fewest = math.inf
        for instance in instances:
            count = self.in_flight(instance.instance_id)
            if count < fewest:
                fewest, best = count, [instance]
            elif count == fewest:
                best.append(instance)
        return best[0] if len(best) == 1 else best[self._rng.randrange(len(best))]


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

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Count the end of a call and fold its latency into the instance's EWMA."""
        super().record(instance, latency, ok)
        stats = self._get(instance.instance_id)
        sample = max(0.0, latency) if ok else max(latency, self.failure_latency)
        now = self._clock()
        current = self._decayed(stats, now)
        if current is None or sample >= current:
            stats.ewma = sample  # peak: slowness shows at once
        else:
            w = math.exp(-max(0.0, now - stats.stamp) / self.decay)
            stats.ewma = current * w + sample * (1.0 - w)
        stats.stamp = now

    def _decayed(self, stats: _Stats, now: float) -> float | None:
        if stats.ewma is None:
            return None
        return stats.ewma * math.exp(-max(0.0, now - stats.stamp) / self.decay)

    def latency(self, instance_id: str) -> float | None:
        """The current latency estimate of `instance_id` in seconds (None: never measured)."""
        stats = self._stats.get(instance_id)
        return None if stats is None else self._decayed(stats, self._clock())

    def _cost(self, instance: HasInstanceId, now: float) -> tuple[float, int]:
        stats = self._stats.get(instance.instance_id)
        in_flight = stats.in_flight if stats else 0
        estimate = self._decayed(stats, now) if stats else None
        if estimate is None:
            estimate = self._default(now)
        # The in-flight count breaks ties while nothing has been measured (estimates 0).
        return estimate * (in_flight + 1), in_flight

    def _default(self, now: float) -> float:
        if self.initial_latency is not None:
            return self.initial_latency
        known = [e for s in self._stats.values() if (e := self._decayed(s, now)) is not None]
        return sum(known) / len(known) if known else 0.0

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """The cheaper of two distinct instances sampled at random."""
        check_instances(instances, "PowerOfTwoEWMA")
        self._prune(instances)
        n = len(instances)
        if n == 1:
            return instances[0]
        first = self._rng.randrange(n)
        second = self._rng.randrange(n - 1)
        if second >= first:
            second += 1  # two distinct, uniformly
        now = self._clock()
        a, b = instances[first], instances[second]
        return b if self._cost(b, now) < self._cost(a, now) else a
