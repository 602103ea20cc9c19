"""Consistent hashing: `HashRing` (virtual nodes, blake2b) and the `ConsistentHash` balancer.

Events with the same key (a CloudEvent attribute or extension) reach the same instance;
when one of N instances joins or leaves, only about 1/N of the keys move.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from loom_ha.balancing.base import (
    Balancer,
    HasInstanceId,
    InstanceT,
    KeyFunc,
    SnapshotCache,
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

    Changes are cheap where they are frequent: a removed node's points stay in place and
    lookups step over them (so an ejected instance that comes back costs nothing), and
    they are swept out once they outnumber the live ones; a joining node's points are
    inserted, not the whole ring rebuilt. A lookup is a hash and a bisect.
    """

    def __init__(self, nodes: Iterable[str] = (), *, vnodes: int = 160) -> None:
        if not isinstance(vnodes, int) or vnodes < 1:
            raise ConfigurationError(f"vnodes must be an int >= 1, got {vnodes!r}")
        self.vnodes = vnodes
        self._weights: dict[str, float] = {}  # the members
        # Nodes whose points are in the arrays (members, and departed ones not yet swept),
        # with the weight they were placed at and their point hashes.
        self._placed: dict[str, tuple[float, list[int]]] = {}
        self._hashes: list[int] = []
        self._owners: list[str] = []
        self._live = 0  # points of members in the arrays
        self._dirty = False  # a member is not placed at its weight, or too many dead points
        for node in nodes:
            self.add(node)

    def add(self, node: str, weight: float = 1.0) -> None:
        """Place `node` (or change its weight); its share is about weight / total weight."""
        if not node:
            raise ConfigurationError("a hash ring node id must not be empty")
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigurationError(f"weight of {node!r} must be > 0, got {weight!r}")
        before = self._weights.get(node)
        if before == weight:
            return
        placed = self._placed.get(node)
        if before is not None and placed is not None and placed[0] == before:
            self._live -= len(placed[1])
        self._weights[node] = weight
        if placed is not None and placed[0] == weight:
            self._live += len(placed[1])  # back: its points never left
        else:
            self._dirty = True

    def remove(self, node: str) -> None:
        """Take `node` off the ring; removing an absent node is a no-op."""
        weight = self._weights.pop(node, None)
        if weight is None:
            return
        placed = self._placed.get(node)
        if placed is not None and placed[0] == weight:
            self._live -= len(placed[1])
        if len(self._hashes) - self._live > self._live:
            self._dirty = True  # sweep the departed before lookups walk over too many

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

    def _points(self, node: str, weight: float) -> list[int]:
        count = max(1, round(self.vnodes * weight))
        return [stable_hash(f"{node}#{i}") for i in range(count)]

    def _refresh(self) -> None:
        """Place members that are not placed at their weight; sweep departed points."""
        self._dirty = False
        joining: list[str] = []
        moved = False  # a placed member changed weight: its old points must go
        for node, weight in self._weights.items():
            placed = self._placed.get(node)
            if placed is None or placed[0] != weight:
                joining.append(node)
                moved = moved or placed is not None
        for node in joining:
            self._placed[node] = (self._weights[node], self._points(node, self._weights[node]))
        added = sum(len(self._placed[node][1]) for node in joining)
        dead = len(self._hashes) - self._live
        if moved or dead > self._live or added > len(self._hashes) // 8:
            self._rebuild()
            return
        for node in joining:
            for point in sorted(self._placed[node][1]):
                self._insert(point, node)
        self._live += added

    def _insert(self, point: int, node: str) -> None:
        # Equal hashes (a 64-bit collision) order by id, as in a rebuild.
        hashes, owners = self._hashes, self._owners
        at = bisect_left(hashes, point)
        while at < len(hashes) and hashes[at] == point and owners[at] < node:
            at += 1
        hashes.insert(at, point)
        owners.insert(at, node)

    def _rebuild(self) -> None:
        # One sort of every member's points (hashed once, when placed). A stable sort of a
        # list laid out in id order puts equal hashes in id order, the same on every process.
        self._placed = {n: self._placed[n] for n in sorted(self._weights)}
        flat = [point for _, points in self._placed.values() for point in points]
        owners = [node for node, (_, points) in self._placed.items() for _ in points]
        order = sorted(range(len(flat)), key=flat.__getitem__)
        self._hashes = [flat[i] for i in order]
        self._owners = [owners[i] for i in order]
        self._live = len(flat)

    def lookup(self, key: str | bytes) -> str:
        """The node that owns `key`.

        Raises:
            NoHealthyInstanceError: the ring is empty.
        """
        if self._dirty:
            self._refresh()
        if not self._weights:
            raise NoHealthyInstanceError("hash ring is empty: no instance to map keys to")
        hashes, owners, members = self._hashes, self._owners, self._weights
        at, total = bisect_right(hashes, stable_hash(key)), len(hashes)
        while True:  # ends: every member has its points on the ring
            if at == total:
                at = 0
            owner = owners[at]
            if owner in members:
                return owner
            at += 1

    def successors(self, key: str | bytes, count: int) -> list[str]:
        """Up to `count` distinct nodes clockwise from `key`: the owner first, then where
        its keys would go if it left (use them to retry elsewhere, or for replicas).

        Raises:
            NoHealthyInstanceError: the ring is empty.
        """
        if self._dirty:
            self._refresh()
        if not self._weights:
            raise NoHealthyInstanceError("hash ring is empty: no instance to map keys to")
        count = min(count, len(self._weights))
        start = bisect_right(self._hashes, stable_hash(key))
        found: list[str] = []
        total = len(self._hashes)
        for step in range(total):
            owner = self._owners[(start + step) % total]
            if owner in self._weights and owner not in found:
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
        self._positions = SnapshotCache(self._sync)

    def key_of(self, event: CloudEventLike | None) -> str | bytes | None:
        """The key `event` is placed by (None: it goes to the fallback)."""
        return None if event is None else self._key(event)

    def _sync(self, instances: Sequence[HasInstanceId]) -> dict[str, int]:
        """Make the ring hold exactly `instances`; their positions by id (the last of a
        repeated id wins). Runs once per distinct instance list."""
        positions = {instance.instance_id: n for n, instance in enumerate(instances)}
        for gone in self.ring.nodes - positions.keys():
            self.ring.remove(gone)
        for instance_id, n in positions.items():
            self.ring.add(instance_id, weight_of(instances[n]) if self.weighted else 1.0)
        return positions

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """The instance owning the event's key (the fallback's choice without a key)."""
        check_instances(instances, "ConsistentHash")
        key = self.key_of(event)
        if key is None:
            return self.fallback.choose(instances, event)
        return instances[self._positions.get(instances)[self.ring.lookup(key)]]

    def started(self, instance: HasInstanceId) -> None:
        """Passed to the fallback."""
        self.fallback.started(instance)

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """Passed to the fallback."""
        self.fallback.record(instance, latency, ok)

    def __repr__(self) -> str:
        return f"<ConsistentHash {self.ring!r} fallback={self.fallback!r}>"
