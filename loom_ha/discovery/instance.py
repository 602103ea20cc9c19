"""What a registry stores and returns: `ServiceInstance`, its `Health`, and `ServiceSnapshot`.

Pure data (frozen dataclasses), no I/O: every registry backend maps to and from these.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Self
from urllib.parse import urlsplit

from loom_ha.errors import ConfigurationError

__all__ = ["Health", "ServiceInstance", "ServiceSnapshot"]

# Service names and instance ids end up in Consul service ids, check ids and URL paths
# and in Redis key names: keep them to characters that are safe in all of these.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# Consul's rule for meta keys (agent/structs: `^[a-zA-Z0-9_-]+$`, at most 128 chars).
_META_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


class Health(enum.Enum):
    """Health of one instance as its registry sees it (Consul's check states)."""

    PASSING = "passing"  # heartbeats arrive and the instance reports itself healthy
    WARNING = "warning"  # alive but degraded; not in the passing set
    CRITICAL = "critical"  # TTL expired, or the instance reported itself unhealthy

    @classmethod
    def worst(cls, states: list[Health]) -> Health:
        """The worst of `states` (Consul aggregates an instance's checks this way)."""
        if Health.CRITICAL in states:
            return Health.CRITICAL
        if Health.WARNING in states:
            return Health.WARNING
        return Health.PASSING


def validate_name(value: str, what: str) -> str:
    """Return `value` if it is a valid service name / instance id.

    Raises:
        ConfigurationError: it is empty, too long, or has characters other than
            letters, digits, ``_``, ``.``, ``-`` (naming `what` and the value).
    """
    if not _NAME.match(value):
        raise ConfigurationError(
            f"{what} {value!r} is invalid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class ServiceInstance:
    """One instance of a service (a Loom node) as registered and as discovered.

    Attributes:
        service: the service name; for Loom, the node id (``agent_1``).
        instance_id: unique among the instances of `service`.
        address: where to reach it: a transport URL (``redis://10.0.0.5:6379``) or host:port.
        tags: free-form labels (Consul tags).
        meta: string key/values; ``version`` and ``transport`` are read by `version` and
            `transport`. Keys follow Consul's rule (letters, digits, ``_``, ``-``).
        weight: relative share for weighted balancing (>= 1).
        health: as last seen by the registry (``PASSING`` when registering).
        note: why the health is what it is (a check's output), if known.
        last_heartbeat: wall-clock time (``time.time()``) of the last heartbeat the registry
            knows of, if it records one.
    """

    service: str
    instance_id: str
    address: str = ""
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    health: Health = Health.PASSING
    note: str = ""
    last_heartbeat: float | None = None

    def __post_init__(self) -> None:
        validate_name(self.service, "service name")
        validate_name(self.instance_id, "instance id")
        if self.weight < 1:
            raise ConfigurationError(f"weight must be >= 1, got {self.weight}")
        for key, value in self.meta.items():
            if not _META_KEY.match(key) or not isinstance(value, str):
                raise ConfigurationError(
                    f"meta key {key!r} must be 1-128 letters, digits, '_' or '-' with a "
                    "string value"
                )
        # Freeze what the caller passed: an instance is shared between tasks.
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def transport(self) -> str:
        """Transport kind: ``meta["transport"]``, else the scheme of `address` (or "")."""
        explicit = self.meta.get("transport")
        if explicit:
            return explicit
        return urlsplit(self.address).scheme if "://" in self.address else ""

    @property
    def version(self) -> str:
        """``meta["version"]`` or ""."""
        return self.meta.get("version", "")

    @property
    def passing(self) -> bool:
        """True when `health` is ``PASSING``."""
        return self.health is Health.PASSING

    def with_health(
        self, health: Health, *, note: str | None = None, last_heartbeat: float | None = None
    ) -> Self:
        """A copy with another health (and optionally note / heartbeat time)."""
        return replace(
            self,
            health=health,
            note=self.note if note is None else note,
            last_heartbeat=self.last_heartbeat if last_heartbeat is None else last_heartbeat,
        )

    def identity(self) -> tuple[object, ...]:
        """Everything a watcher cares about: all fields but note and heartbeat time."""
        return (
            self.service,
            self.instance_id,
            self.address,
            self.tags,
            tuple(sorted(self.meta.items())),
            self.weight,
            self.health,
        )


@dataclass(frozen=True, kw_only=True)
class ServiceSnapshot:
    """The instances of one service at one moment, as a registry answered.

    Attributes:
        service: the service asked for.
        instances: sorted by instance id; only passing ones when asked for passing only.
        index: the registry's version of this answer (Consul's ``X-Consul-Index``); it
            grows with changes but may be reset by the registry (then it goes backwards).
        stale: True when the registry could not be reached and this is the last good answer.
        error: why the snapshot is stale, if it is.
    """

    service: str
    instances: tuple[ServiceInstance, ...]
    index: int
    stale: bool = False
    error: str | None = None

    @property
    def ids(self) -> list[str]:
        """Instance ids, in order."""
        return [i.instance_id for i in self.instances]

    def passing(self) -> ServiceSnapshot:
        """This snapshot restricted to passing instances."""
        return replace(self, instances=tuple(i for i in self.instances if i.passing))

    def as_stale(self, error: str) -> ServiceSnapshot:
        """This snapshot marked stale because of `error`."""
        return replace(self, stale=True, error=error)

    def same_as(self, other: ServiceSnapshot | None) -> bool:
        """Same instances (ignoring heartbeat times) and same staleness."""
        if other is None or self.stale != other.stale:
            return False
        return [i.identity() for i in self.instances] == [i.identity() for i in other.instances]
