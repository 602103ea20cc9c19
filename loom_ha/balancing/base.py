"""The balancing contract: the `Balancer` Protocol, what an instance must look like, weights.

Pure bookkeeping, no I/O. Strategies live in `strategies`, `hashring` and `ejection`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Generic, Protocol, TypeAlias, TypeVar, runtime_checkable

from loom_ha.errors import ConfigurationError, NoHealthyInstanceError

if TYPE_CHECKING:
    from loom_ha.event import CloudEventLike

__all__ = [
    "Balancer",
    "Clock",
    "HasInstanceId",
    "InstanceT",
    "KeyFunc",
    "SnapshotCache",
    "Weighted",
    "check_instances",
    "track",
    "weight_of",
]

Clock: TypeAlias = Callable[[], float]
"""Seconds from an arbitrary origin (`time.monotonic` by default; a fake one in tests)."""

KeyFunc: TypeAlias = "Callable[[CloudEventLike], str | bytes | None]"
"""Extracts the affinity key of an event; None means "no key" (the fallback chooses)."""


@runtime_checkable
class HasInstanceId(Protocol):
    """Anything a balancer can choose: `ServiceInstance`, or any object with an id."""

    @property
    def instance_id(self) -> str:
        """Unique among the instances offered to one balancer."""
        ...


class Weighted(HasInstanceId, Protocol):
    """An instance with a relative share (`ServiceInstance.weight`, >= 1)."""

    @property
    def weight(self) -> int:
        """Relative share of the traffic."""
        ...


InstanceT = TypeVar("InstanceT", bound=HasInstanceId)


class Balancer(Protocol):
    """Picks one instance per call and learns from the outcome.

    Callers follow one protocol for every strategy::

        instance = balancer.choose(instances, event)
        balancer.started(instance)
        ...  # the call
        balancer.record(instance, latency, ok)

    `record` must follow each `started` exactly once (use `track()` to get this right).
    Bookkeeping is keyed by `instance_id`, so the instance list may be a fresh snapshot on
    every call; state of instances that left is dropped lazily. Balancers are meant for one
    event loop (no locks): call them from one thread.
    """

    def choose(
        self, instances: Sequence[InstanceT], event: CloudEventLike | None = None
    ) -> InstanceT:
        """Return one of `instances` for `event`.

        Raises:
            NoHealthyInstanceError: `instances` is empty (or everything is excluded).
        """
        ...

    def started(self, instance: HasInstanceId) -> None:
        """A call to `instance` begins (counts it in flight)."""
        ...

    def record(self, instance: HasInstanceId, latency: float, ok: bool) -> None:
        """A call to `instance` ended after `latency` seconds, successfully or not."""
        ...


Derived = TypeVar("Derived")


class SnapshotCache(Generic[Derived]):
    """What a strategy derives from an instance list (prefix sums, a ring, an index), built
    once per distinct list so that a choice costs O(1) or O(log n), not O(n).

    The routing layer hands over the same tuple until the registry reports a change, so
    the usual check is one identity test. Any other sequence (a list may have been
    changed in place) is compared with the last one at C speed, element identity first,
    then ``==``: a caller that builds an equal list per call pays a copy and a compare
    (about 2 µs per 1,000 instances), not a rebuild. Equal instances are interchangeable,
    so a derived structure stores positions and ids, and strategies return elements of
    the list they were given.
    """

    __slots__ = ("_build", "_entry")

    def __init__(self, build: Callable[[tuple[HasInstanceId, ...]], Derived]) -> None:
        self._build = build
        self._entry: tuple[tuple[HasInstanceId, ...], Derived] | None = None

    def get(self, instances: Sequence[HasInstanceId]) -> Derived:
        """The structure derived from `instances`, rebuilt only if they differ from the last."""
        entry = self._entry
        if entry is not None and instances is entry[0]:
            return entry[1]
        items = instances if type(instances) is tuple else tuple(instances)
        if entry is None or items != entry[0]:
            entry = (items, self._build(items))
        self._entry = (items, entry[1])
        return entry[1]

    @property
    def current(self) -> Derived | None:
        """The structure of the last list seen (None before the first)."""
        return None if self._entry is None else self._entry[1]


def check_instances(instances: Sequence[InstanceT], who: str) -> None:
    """Raise `NoHealthyInstanceError` when `instances` is empty."""
    if not instances:
        raise NoHealthyInstanceError(
            f"{who}: no instance to choose from (none registered, none passing, "
            "or all excluded); check the registry and the instances' health"
        )


def weight_of(instance: object) -> float:
    """The relative share of `instance`.

    ``meta["weight"]`` wins when it is a positive number (Consul users often set weights as
    service meta), then the `weight` attribute, else 1. Invalid values count as 1 rather
    than failing a call.
    """
    meta = getattr(instance, "meta", None)
    if isinstance(meta, Mapping):
        raw = meta.get("weight")
        if raw is not None:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if math.isfinite(value) and value > 0:
                return value
    attr = getattr(instance, "weight", 1)
    if isinstance(attr, int | float) and not isinstance(attr, bool):
        value = float(attr)
        if math.isfinite(value) and value > 0:
            return value
    return 1.0


def positive(name: str, value: float) -> float:
    """Return `value` if it is a finite number > 0, else raise `ConfigurationError`."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@contextmanager
def track(
    balancer: Balancer, instance: HasInstanceId, *, clock: Clock = time.monotonic
) -> Iterator[None]:
    """Bracket one call: `started()` now, `record()` with the elapsed time on exit.

    The call counts as failed when the block raises, cancellation included (that is how
    `asyncio.timeout` ends a slow call); the exception propagates. In-flight counts never
    leak.
    """
    balancer.started(instance)
    begin = clock()
    ok = False
    try:
        yield
        ok = True
    finally:
        balancer.record(instance, max(0.0, clock() - begin), ok)
