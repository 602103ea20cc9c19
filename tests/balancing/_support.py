"""Shared helpers of the balancing tests: plain instances, a fake clock, a load simulator, stats."""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from loom_ha.balancing import Balancer


@dataclass(frozen=True)
class Node:
    """The least an instance needs: an id (and optionally a weight and meta)."""

    instance_id: str
    weight: int = 1
    meta: Mapping[str, str] = field(default_factory=dict)


def nodes(count: int, prefix: str = "n") -> list[Node]:
    """`count` instances named n0, n1, ..."""
    return [Node(f"{prefix}{i}") for i in range(count)]


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def binomial_bound(trials: int, p: float, sigmas: float = 5.0) -> float:
    """Half-width of the acceptance band for a binomial count: `sigmas` standard deviations."""
    return sigmas * math.sqrt(trials * p * (1.0 - p))


def chi_square_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with `df` degrees of freedom (closed form)."""
    half = x / 2.0
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return math.exp(-half) * total
    total = math.erfc(math.sqrt(half))
    k = 1
    while k < df:  # sf(x; k + 2) = sf(x; k) + (x/2)^(k/2) e^(-x/2) / Gamma(k/2 + 1)
        total += math.exp((k / 2.0) * math.log(half) - half - math.lgamma(k / 2.0 + 1.0))
        k += 2
    return total


def chi_square(counts: Mapping[str, int], expected: Mapping[str, float]) -> tuple[float, float]:
    """Pearson's statistic of `counts` against `expected`, and its p-value."""
    stat = sum((counts.get(k, 0) - e) ** 2 / e for k, e in expected.items())
    return stat, chi_square_sf(stat, len(expected) - 1)


def simulate(
    balancer: Balancer,
    instances: Sequence[Node],
    *,
    requests: int,
    interarrival: float,
    service_time: Callable[[str, int], float],
    clock: FakeClock,
) -> Counter[str]:
    """Open-loop load: a request every `interarrival` seconds, each served after
    `service_time(instance_id, request_number)`; outcomes are recorded as they complete.

    Calls still in flight at the end complete (and are recorded) before it returns.
    Returns how many requests each instance received.
    """
    pending: list[tuple[float, int, Node, float]] = []
    got: Counter[str] = Counter()
    for n in range(requests):
        while pending and pending[0][0] <= clock.now:
            end, _, node, began = heapq.heappop(pending)
            saved, clock.now = clock.now, end
            balancer.record(node, end - began, True)
            clock.now = saved
        node = balancer.choose(instances)
        balancer.started(node)
        got[node.instance_id] += 1
        heapq.heappush(pending, (clock.now + service_time(node.instance_id, n), n, node, clock.now))
        clock.advance(interarrival)
    for end, _, node, began in sorted(pending):  # drain: every started call is recorded
        clock.now = max(clock.now, end)
        balancer.record(node, end - began, True)
    return got
