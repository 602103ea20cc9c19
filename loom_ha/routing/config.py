"""Build a `BalancedTransport` from names and the environment (the one-line switch's routing part).

LOOM_HA_REGISTRY=consul://127.0.0.1:8500   # turns routing on (also redis://, memory://)
LOOM_HA_BALANCER=p2c                       # round_robin | random | weighted |
                                           # least_outstanding | p2c | hash:<attribute>
LOOM_HA_ATTEMPT_TIMEOUT=10                 # seconds before a request moves on
LOOM_HA_INSTANCE_ID=api-1                  # this process's id (default host-pid)
LOOM_HA_DEDUP_URL=redis://...              # shared dedup window of the serving side
LOOM_HA_MAX_WATCHES=64                     # Consul: services one process may route to (32)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from loom_ha.balancing import (
    Balancer,
    ConsistentHash,
    Ejector,
    LeastOutstanding,
    PowerOfTwoEWMA,
    Random,
    RoundRobin,
    WeightedRandom,
)
from loom_ha.errors import ConfigurationError
from loom_ha.ha.dedup import DedupWindow
from loom_ha.routing.transport import DEFAULT_ATTEMPT_TIMEOUT, BalancedTransport
from loom_ha.spec import parse_transport_url
from loom_ha.transport import Transport

__all__ = ["BALANCERS", "balanced_from_env", "balancer_named"]

BALANCERS = ("round_robin", "random", "weighted", "least_outstanding", "p2c", "hash:<attribute>")


def balancer_named(name: str, *, eject: bool = True) -> Balancer:
    """The strategy called `name` (see `BALANCERS`), wrapped in an `Ejector` unless told not.

    Raises:
        ConfigurationError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower().replace("-", "_")
    strategy: Balancer
    if key == "round_robin":
        strategy = RoundRobin()
    elif key == "random":
        strategy = Random()
    elif key == "weighted":
        strategy = WeightedRandom()
    elif key == "least_outstanding":
        strategy = LeastOutstanding()
    elif key in ("p2c", "p2c_ewma"):
        strategy = PowerOfTwoEWMA()
    elif key.startswith("hash:") and key[5:]:
        strategy = ConsistentHash(name.strip()[5:])
    else:
        raise ConfigurationError(f"balancer {name!r}: expected one of {', '.join(BALANCERS)}")
    return Ejector(strategy, consecutive_failures=3, base_ejection=10.0) if eject else strategy


def _shared_dedup(
    env: Mapping[str, str], transport_url: str, attempt_timeout: float
) -> DedupWindow | bool:
    """The serving side's dedup window, shared between instances when delivery is durable.

    ``LOOM_HA_DEDUP_URL`` (``redis://`` or ``nats://``) names one; otherwise a durable mode
    (Streams, JetStream) shares it through its own broker (Redis keys, a JetStream KV
    bucket; Sentinel URLs need ``LOOM_HA_DEDUP_URL``), and at-most-once modes dedup in
    process. The lease is at most half the attempt timeout, so the claim of an instance
    that died mid-request has lapsed when the next attempt reaches another instance.
    """
    lease = min(3.0, attempt_timeout / 2)
    url = env.get("LOOM_HA_DEDUP_URL", "").strip()
    if not url:
        spec = parse_transport_url(transport_url) if transport_url else None
        if (
            spec is None
            or not spec.durable
            or spec.scheme not in ("redis", "rediss", "nats", "tls")
        ):
            return True
        url = spec.address
    window = parse_transport_url(url)  # one parser: scheme-less servers, a query, named errors
    if window.broker == "nats":
        from loom_ha.nats import NatsDedup

        return NatsDedup(list(window.servers), ttl=600.0, lease=lease)
    if window.broker == "redis":
        from loom_ha.redis import RedisDedup

        return RedisDedup(url, lease=lease)
    raise ConfigurationError(
        f"LOOM_HA_DEDUP_URL must name a redis:// or nats:// server, not {window.scheme}://"
    )


def balanced_from_env(
    inner: Transport, env: Mapping[str, str] | None = None, *, transport_url: str = ""
) -> Transport:
    """`inner` wrapped in a `BalancedTransport` if ``LOOM_HA_REGISTRY`` is set, else `inner`.

    Raises:
        ConfigurationError: a bad registry URL, balancer name or number (named).
    """
    env = os.environ if env is None else env
    registry_url = env.get("LOOM_HA_REGISTRY", "").strip()
    if not registry_url:
        return inner
    from loom_ha.discovery import open_registry

    options: dict[str, Any] = {}
    attempt_timeout = DEFAULT_ATTEMPT_TIMEOUT
    timeout = env.get("LOOM_HA_ATTEMPT_TIMEOUT", "").strip()
    if timeout:
        try:
            attempt_timeout = float(timeout)
        except ValueError:
            raise ConfigurationError(
                f"LOOM_HA_ATTEMPT_TIMEOUT={timeout!r} is not a number of seconds"
            ) from None
        if not attempt_timeout > 0:
            raise ConfigurationError(f"LOOM_HA_ATTEMPT_TIMEOUT={timeout!r} must be > 0")
    balancer = env.get("LOOM_HA_BALANCER", "").strip()
    if balancer:
        options["balancer"] = balancer_named(balancer)
    instance_id = env.get("LOOM_HA_INSTANCE_ID", "").strip()
    if instance_id:
        options["instance_id"] = instance_id
    return BalancedTransport(
        inner,
        open_registry(registry_url, **_registry_options(env, registry_url)),
        attempt_timeout=attempt_timeout,
        dedup=_shared_dedup(env, transport_url, attempt_timeout),
        **options,
    )


def _registry_options(env: Mapping[str, str], registry_url: str) -> dict[str, Any]:
    """``LOOM_HA_MAX_WATCHES``: each routed-to service holds one Consul blocking query (one
    connection); a process routing to more services than the default 32 raises it."""
    text = env.get("LOOM_HA_MAX_WATCHES", "").strip()
    if not text:
        return {}
    if not registry_url.lower().startswith(("consul://", "consul+https://")):
        raise ConfigurationError("LOOM_HA_MAX_WATCHES applies to consul:// registries only")
    try:
        watches = int(text)
    except ValueError:
        raise ConfigurationError(f"LOOM_HA_MAX_WATCHES={text!r} is not a whole number") from None
    if watches < 1:
        raise ConfigurationError(f"LOOM_HA_MAX_WATCHES={text!r} must be >= 1")
    return {"max_watches": watches}
