"""The balancing contract: the `Balancer` Protocol, what an instance must look like, weights.

Pure bookkeeping, no I/O. Strategies live in `strategies`, `hashring` and `ejection`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar, runtime_checkable

from loom_ha.errors import ConfigurationError, NoHealthyInstanceError

if TYPE_CHECKING:
    from loom_ha.event import CloudEventLike

__all__ = [
    "Balancer",
    "Clock",
    "HasInstanceId",
    "InstanceT",
    "KeyFunc",
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
