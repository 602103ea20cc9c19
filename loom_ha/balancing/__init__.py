"""Load balancing: pick one instance per call, learn from outcomes, eject failing instances.

Pure bookkeeping (no I/O, injectable clocks and random sources); see docs/balancing.md.
"""

from __future__ import annotations

from loom_ha.balancing.base import (
    Balancer,
    Clock,
    HasInstanceId,
    KeyFunc,
    Weighted,
    track,
    weight_of,
)
from loom_ha.balancing.ejection import Ejector, EjectorStatistics
from loom_ha.balancing.hashring import ConsistentHash, HashRing, attribute_key, stable_hash
from loom_ha.balancing.strategies import (
    BalancerBase,
    LeastOutstanding,
    PowerOfTwoEWMA,
    Random,
    RoundRobin,
    WeightedRandom,
)

__all__ = [
    "Balancer",
    "BalancerBase",
    "Clock",
    "ConsistentHash",
    "Ejector",
    "EjectorStatistics",
    "HasInstanceId",
    "HashRing",
    "KeyFunc",
    "LeastOutstanding",
    "PowerOfTwoEWMA",
    "Random",
    "RoundRobin",
    "Weighted",
    "WeightedRandom",
    "attribute_key",
    "stable_hash",
    "track",
    "weight_of",
]
