"""Consistent hashing: `HashRing` (virtual nodes, blake2b) and the `ConsistentHash` balancer.

Events with the same key (a CloudEvent attribute or extension) reach the same instance;
when one of N instances joins or leaves, only about 1/N of the keys move.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from loom_ha.balancing.base import (
    Balancer,
    HasInstanceId,
    InstanceT,
    KeyFunc,
    check_instances,
    weight_of,
)
from loom_ha.balancing.strategies import RoundRobin
from loom_ha.errors import ConfigurationError, NoHealthyInstanceError

if TYPE_CHECKING:
    from loom_ha.event import CloudEventLike

__all__ = ["ConsistentHash", "HashRing", "attribute_key", "stable_hash"]

_CORE_ATTRIBUTES = frozenset(
    ("id", "source", "type", "subject", "specversion", "datacontenttype", "dataschema")
)


def stable_hash(data: str | bytes) -> int:
    """A 64-bit hash that is the same in every process and on every machine.

    (Python's `hash()` is salted per process, so it cannot place keys on a shared ring.)
    """
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class HashRing:
    """Node ids placed at `vnodes` x weight points each on a 64-bit ring.

    A key belongs to the first point clockwise from its hash. A node's points depend only
    on its id (point ``i`` hashes ``"<id>#<i>"``), so the ring is a pure function of its
    nodes and weights: adding a node takes keys only *to* that node, removing one moves
    only *its* keys, and adding then removing a node restores every mapping.
    """

    def __init__(self, nodes: Iterable[str] = (), *, vnodes: int = 160) -> None:
        if not isinstance(vnodes, int) or vnodes < 1:
            raise ConfigurationError(f"vnodes must be an int >= 1, got {vnodes!r}")
        self.vnodes = vnodes
        self._weights: dict[str, float] = {}
        self._hashes: list[int] = []
        self._owners: list[str] = []
        self._dirty = False
        for node in nodes:
            self.add(node)

    def add(self, node: str, weight: float = 1.0) -> None:
        """Place `node` (or change its weight); its share is about weight / total weight."""
        if not node:
            raise ConfigurationError("a hash ring node id must not be empty")
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigurationError(f"weight of {node!r} must be > 0, got {weight!r}")
        if self._weights.get(node) != weight:
            self._weights[node] = weight
            self._dirty = True

    def remove(self, node: str) -> None:
        """Take `node` off the ring; removing an absent node is a no-op."""
        if self._weights.pop(node, None) is not None:
            self._dirty = True

    @property
    def nodes(self) -> frozenset[str]:
        """The node ids on the ring."""
        return frozenset(self._weights)

    def weight(self, node: str) -> float | None:
        """The weight `node` was added with (None: not on the ring)."""
        return self._weights.get(node)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def _points(self, node: str, weight: float) -> Iterable[tuple[int, str]]:
        count = max(1, round(self.vnodes * weight))
        return ((stable_hash(f"{node}#{i}"), node) for i in range(count))

    def _build(self) -> None:
        # Rebuild in one sort rather than insort per point: O(P log P), P ~ 160 * nodes.
        # Ties (a 64-bit collision) go to the smaller id, the same on every process.
        points = sorted(p for node, w in self._weights.items() for p in self._points(node, w))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]
        self._dirty = False

    def lookup(self, key: str | bytes) -> str:
        """The node that owns `key`.

        Raises:
            NoHealthyInstanceError: the ring is empty.
        """
        return self.successors(key, 1)[0]

    def successors(self, key: str | bytes, count: int) -> list[str]:
        """Up to `count` distinct nodes clockwise from `key`: the owner first, then where
        its keys would go if it left (use them to retry elsewhere, or for replicas).

        Raises:
            NoHealthyInstanceError: the ring is empty.
        """
        if self._dirty:
            self._build()
        if not self._hashes:
            raise NoHealthyInstanceError("hash ring is empty: no instance to map keys to")
        count = min(count, len(self._weights))
        start = bisect_right(self._hashes, stable_hash(key))
        found: list[str] = []
        total = len(self._hashes)
        for step in range(total):
            owner = self._owners[(start + step) % total]
            if owner not in found:
                found.append(owner)
                if len(found) == count:
                    break
        return found

    def __repr__(self) -> str:
        return f"<HashRing nodes={len(self._weights)} vnodes={self.vnodes}>"


def attribute_key(name: str) -> KeyFunc:
    """A key function reading attribute `name` of an event.

    Core CloudEvent attributes (``subject``, ``source``, ``type``, ...) are read directly;
    any other name is looked up in ``event.extensions`` and then as an extra attribute
    (Loom keeps unknown attributes as model extras). Missing or empty values give None;
    non-string values are keyed by their ``str()``.
    """
    if not name:
        raise ConfigurationError("the hash key attribute name must not be empty")

    def key(event: CloudEventLike) -> str | bytes | None:
        value: object = None
        if name in _CORE_ATTRIBUTES:
            value = getattr(event, name, None)
        else:
            extensions = getattr(event, "extensions", None)
            if isinstance(extensions, Mapping):
                value = extensions.get(name)
            if value is None:
                value = getattr(event, name, None)
        if value is None or value in ("", b""):
            return None
        return value if isinstance(value, str | bytes) else str(value)

    key.__qualname__ = f"attribute_key({name!r})"
    return key


class ConsistentHash:
    """Sends every event with the same key to the same instance (session affinity).

    The ring follows the instance list given to each `choose()`: instances that join or
    leave (or are ejected) move only their share of keys. Events without a key (or
    `choose()` without an event) go to `fallback` (round robin by default), which also
    receives `started`/`record`.

    Args:
        key: an attribute name (``"subject"``, or an extension such as ``"session"``) or
            a function from event to key.
        vnodes: points per instance (per unit of weight); more points, smoother spread.
        weighted: give each instance ``vnodes * weight`` points (see `weight_of`).
        fallback: the strategy for events without a key.
    """

    def __init__(
        self,
        key: str | KeyFunc = "subject",
        *,
        vnodes: int = 160,
        weighted: bool = False,
        fallback: Balancer | None = None,
    ) -> None:
        self._key: Callable[[CloudEventLike], str | bytes | None] = (
            attribute_key(key) if isinstance(key, str) else key
        )
        self.ring = HashRing(vnodes=vnodes)
        self.weighted = weighted
        self.fallback: Balancer = fallback if fallback is not None else RoundRobin()

    def key_of(self, event: CloudEventLike | None) -> str | bytes | None:
        """The key `event` is placed by (None: it goes to the fallback)."""
        return None if event is None else self._key(event)

    def _sync(self, by_id: Mapping[str, HasInstanceId]) -> None:
        for gone in self.ring.nodes - by_id.keys():
            self.ring.remove(gone)
        for instance_id, instance in by_id.items():
            self.ring.add(instance_id, weight_of(instance) if self.weighted else 1.0)

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """The instance owning the event's key (the fallback's choice without a key)."""
        check_instances(instances, "ConsistentHash")
        key = self.key_of(event)
        if key is None:
            return self.fallback.choose(instances, event)
        by_id = {i.instance_id: i for i in instances}
        self._sync(by_id)
        return by_id[self.ring.lookup(key)]

    def started(self, instance: HasInstanceId) -> None:
        """Passed to the fallback."""
        self.fallback.started(instance)

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Passed to the fallback."""
        self.fallback.record(instance, latency, ok)

    def __repr__(self) -> str:
        return f"<ConsistentHash {self.ring!r} fallback={self.fallback!r}>"
