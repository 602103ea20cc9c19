"""The one-line switch: build a transport from a URL or from the environment.

    create_transport("memory://")
    create_transport("redis://10.0.0.5:6379/0?mode=streams")
    create_transport("redis+sentinel://s1:26379,s2:26379/mymaster?mode=pubsub")
    create_transport("redis://10.0.0.5:6379/0?mode=streams&pubsub_topics=node.response/*")
    create_transport("nats://n1:4222,nats://n2:4222?mode=jetstream&outbox=fail_fast")
    transport_from_env()   # LOOM_TRANSPORT, REDIS_URL, NATS_SERVERS, LOOM_HA_OPTIONS

Every transport comes wrapped in `HATransport` (pass ``ha=false`` to get the bare
backend). The URL is parsed once (`loom_ha.spec.parse_transport_url`); a bad URL or
option raises `ConfigurationError` naming it, before anything connects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from loom_ha.errors import ConfigurationError
from loom_ha.ha.dedup import DedupWindow, MemoryDedup
from loom_ha.ha.failover import HATransport
from loom_ha.memory import InMemoryTransport
from loom_ha.spec import TransportSpec, parse_transport_url
from loom_ha.transport import Transport

HA_INNER_PUBLISH_TIMEOUT = 5.0
"""Seconds a wrapped backend retries one publish before HATransport's outbox takes it."""


def _redis(spec: TransportSpec, event_class: Any) -> Transport:
    from loom_ha.redis import (
        ModeRouter,
        RedisPubSubTransport,
        RedisStreamsTransport,
        RedisTransport,
    )

    opts = spec.options
    common: dict[str, Any] = {"group_rule": opts.group_rule}
    if event_class is not None:
        common["event_class"] = event_class
    if opts.ha:
        # HATransport takes over longer outages (outbox, replay): fail over to it quickly.
        common["publish_timeout"] = HA_INNER_PUBLISH_TIMEOUT
    if spec.mode == "pubsub" and not spec.topic_modes:
        return RedisPubSubTransport(spec.backend_url, **common)
    if spec.delivery_policy is not None:
        common["policy"] = spec.delivery_policy
    if not spec.topic_modes:
        return RedisStreamsTransport(spec.backend_url, **common)
    try:
        ModeRouter(spec.mode, spec.topic_modes)  # checked first: errors name the URL option
    except ConfigurationError as exc:
        names = " / ".join(sorted({f"{m}_topics" for m in spec.topic_modes.values()}))
        raise ConfigurationError(f"option {names}: {exc}") from None
    return RedisTransport(
        spec.backend_url,
        mode=spec.mode,
        topic_modes=spec.topic_modes,
        **common,
    )


def _nats(spec: TransportSpec, event_class: Any) -> Transport:
    from loom_ha.event import EventCodec
    from loom_ha.nats import JetStreamTransport, NatsCoreTransport, url_options

    opts = spec.options
    common: dict[str, Any] = {"group_rule": opts.group_rule, **url_options(spec.backend_options)}
    if event_class is not None:
        common["codec"] = EventCodec(event_class)
    if spec.mode == "core":
        return NatsCoreTransport(list(spec.servers), **common)
    if opts.ha:
        common["publish_timeout"] = HA_INNER_PUBLISH_TIMEOUT
    if spec.delivery_policy is not None:
        from loom_ha.nats.options import ConsumerOptions

        common["consumer"] = ConsumerOptions(policy=spec.delivery_policy)
    return JetStreamTransport(list(spec.servers), **common)


def _backend(spec: TransportSpec, event_class: Any) -> Transport:
    """A new bare transport as `spec` describes it."""
    if spec.broker == "redis":
        return _redis(spec, event_class)
    if spec.broker == "nats":
        return _nats(spec, event_class)
    return InMemoryTransport(group_rule=spec.options.group_rule)


def _dedup(spec: TransportSpec) -> DedupWindow | bool:
    opts = spec.options
    if opts.dedup == "off":
        return False
    if opts.dedup == "memory":
        return MemoryDedup(ttl=opts.dedup_ttl)
    redis_url = opts.dedup_url or (spec.address if spec.scheme in ("redis", "rediss") else None)
    if redis_url is None:
        raise ConfigurationError("dedup=redis needs dedup_url=redis://... for this transport")
    from loom_ha.redis import RedisDedup

    return RedisDedup(redis_url, ttl=opts.dedup_ttl)


def create_transport(url: str, *, event_class: Any = None) -> Transport:
    """Build the transport a URL describes (wrapped in `HATransport` unless ``ha=false``).

    Args:
        url: ``memory://``, ``redis://``, ``rediss://``, ``redis+sentinel://``, or one or
            more comma-separated ``nats://`` / ``tls://`` servers; options in the query
            string (see docs/index.md and docs/quickstart.md).
        event_class: the class received events are built as (Loom's under LoomApp).

    Raises:
        ConfigurationError: the URL, its scheme or an option is invalid; the message
            names the offending part.
    """
    spec = parse_transport_url(url)
    first: Transport | None = _backend(spec, event_class)  # backend options checked now
    if not spec.options.ha:
        assert first is not None
        return first

    def backend() -> Transport:
        """The transport built above first; a new one for every later failover."""
        nonlocal first
        made, first = first or _backend(spec, event_class), None
        return made

    return HATransport(backend, outbox=spec.options.outbox, dedup=_dedup(spec))


def transport_from_env(
    env: Mapping[str, str] | None = None, *, event_class: Any = None
) -> Transport:
    """Build the transport the environment asks for (compatible with loom-agent 0.3.4).

    ``LOOM_TRANSPORT`` is ``memory`` (default), ``redis``, ``nats`` or a full URL;
    ``REDIS_URL`` and ``NATS_SERVERS`` (comma-separated) say where, as in Loom;
    ``LOOM_HA_OPTIONS`` adds query-string options (``mode=core&outbox=fail_fast``).
    ``LOOM_HA_REGISTRY`` (``consul://...``) adds instance-aware request routing: the
    transport becomes a `BalancedTransport` (see `loom_ha.routing.config` for the rest).
    """
    env = os.environ if env is None else env
    kind = env.get("LOOM_TRANSPORT", "memory").strip()
    if "://" in kind:
        url = kind
    elif kind.lower() == "memory":
        url = "memory://"
    elif kind.lower() == "redis":
        url = env.get("REDIS_URL", "redis://localhost:6379")
    elif kind.lower() == "nats":
        url = env.get("NATS_SERVERS", "nats://localhost:4222")
    else:
        raise ConfigurationError(
            f"LOOM_TRANSPORT={kind!r}: expected memory, redis, nats or a transport URL"
        )
    extra = env.get("LOOM_HA_OPTIONS", "").strip().lstrip("?&")
    if extra:
        url += ("&" if "?" in url else "?") + extra
    from loom_ha.routing.config import balanced_from_env

    return balanced_from_env(create_transport(url, event_class=event_class), env, transport_url=url)
