"""The one-line switch: build a transport from a URL or from the environment.

    create_transport("memory://")
    create_transport("redis://10.0.0.5:6379/0?mode=streams")
    create_transport("redis+sentinel://s1:26379,s2:26379/mymaster?mode=pubsub")
    create_transport("redis://10.0.0.5:6379/0?mode=streams&pubsub_topics=node.response/*")
    create_transport("nats://n1:4222,nats://n2:4222?mode=jetstream&outbox=fail_fast")
    transport_from_env()   # LOOM_TRANSPORT, REDIS_URL, NATS_SERVERS, LOOM_HA_OPTIONS

Every transport comes wrapped in `HATransport` (pass ``ha=false`` to get the bare
backend). loom-ha's own options ride in the query string; anything else in it is
left to the backend (for example Redis' ``db``). A bad URL or option raises
`ConfigurationError` naming it, before anything connects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from loom_ha.errors import ConfigurationError
from loom_ha.ha.dedup import DedupWindow, MemoryDedup
from loom_ha.ha.failover import HATransport
from loom_ha.ha.outbox import OutboxConfig, OutboxPolicy
from loom_ha.memory import InMemoryTransport
from loom_ha.policy import DeliveryPolicy
from loom_ha.transport import GroupRule, Transport, loom_request_groups

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel")
NATS_SCHEMES = ("nats", "tls")
MODES = {"redis": ("streams", "pubsub"), "nats": ("jetstream", "core"), "memory": ("memory",)}
"""Modes per broker; the first is the default (durable where the broker offers it)."""

HA_INNER_PUBLISH_TIMEOUT = 5.0
"""Seconds a wrapped backend retries one publish before HATransport's outbox takes it."""

_GROUP_RULES: dict[str, GroupRule | None] = {"loom": loom_request_groups, "none": None}


@dataclass
class TransportOptions:
    """loom-ha's options, parsed from a URL's query string."""

    mode: str | None = None
    ha: bool = True
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    dedup: str = "memory"
    dedup_ttl: float = 600.0
    dedup_url: str | None = None
    group_rule: GroupRule | None = loom_request_groups
    max_deliveries: int | None = None


def _number(name: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ConfigurationError(f"option {name}={text!r} is not a valid {kind.__name__}") from None


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise ConfigurationError(f"option {name}={text!r}: expected one of {', '.join(choices)}")
    return text


def _parse_options(pairs: list[tuple[str, str]]) -> tuple[TransportOptions, list[tuple[str, str]]]:
    """Split loom-ha options from the backend's own query parameters."""
    opts, rest = TransportOptions(), []
    outbox: dict[str, Any] = {}
    for name, value in pairs:
        if name == "mode":
            opts.mode = value
        elif name == "ha":
            opts.ha = _choice(name, value.lower(), ("true", "false", "1", "0")) in ("true", "1")
        elif name == "outbox":
            policies = tuple(p.value for p in OutboxPolicy)
            outbox["policy"] = OutboxPolicy(_choice(name, value, policies))
        elif name == "outbox_size":
            outbox["max_size"] = _number(name, value, int)
        elif name == "outbox_timeout":
            outbox["timeout"] = _number(name, value, float)
        elif name == "dedup":
            opts.dedup = _choice(name, value, ("memory", "redis", "off"))
        elif name == "dedup_ttl":
            opts.dedup_ttl = _number(name, value, float)
        elif name == "dedup_url":
            opts.dedup_url = value
        elif name == "group_rule":
            opts.group_rule = _GROUP_RULES[_choice(name, value, tuple(_GROUP_RULES))]
        elif name == "max_deliveries":
            opts.max_deliveries = _number(name, value, int)
        else:
            rest.append((name, value))
    opts.outbox = OutboxConfig(**outbox)
    return opts, rest


def _mode(broker: str, opts: TransportOptions) -> str:
    choices = MODES[broker]
    return _choice("mode", opts.mode, choices) if opts.mode else choices[0]


def _policy(opts: TransportOptions) -> DeliveryPolicy | None:
    return DeliveryPolicy(max_deliveries=opts.max_deliveries) if opts.max_deliveries else None


REDIS_TOPIC_OPTIONS = {"pubsub_topics": "pubsub", "streams_topics": "streams"}
"""Redis URL options that route topic patterns to a mode (comma-separated or repeated)."""


Pairs = list[tuple[str, str]]


def _redis_topic_modes(rest: Pairs) -> tuple[dict[str, str], Pairs]:
    """Split ``pubsub_topics=`` / ``streams_topics=`` from the other Redis URL options."""
    topic_modes: dict[str, str] = {}
    others: Pairs = []
    for name, value in rest:
        mode = REDIS_TOPIC_OPTIONS.get(name)
        if mode is None:
            others.append((name, value))
            continue
        patterns = [p for p in value.split(",") if p]
        if not patterns:
            raise ConfigurationError(f"option {name}= names no topic pattern")
        for pattern in patterns:
            if topic_modes.get(pattern, mode) != mode:
                raise ConfigurationError(
                    f"option {name}: {pattern!r} is also in {topic_modes[pattern]}_topics"
                )
            topic_modes[pattern] = mode
    return topic_modes, others


def _redis(url: str, opts: TransportOptions, rest: list[tuple[str, str]], event_class: Any) -> Any:
    from loom_ha.redis import (
        ModeRouter,
        RedisPubSubTransport,
        RedisStreamsTransport,
        RedisTransport,
    )

    topic_modes, rest = _redis_topic_modes(rest)
    parts = urlsplit(url)
    backend_url = urlunsplit(parts._replace(query=urlencode(rest)))
    common: dict[str, Any] = {"group_rule": opts.group_rule}
    if event_class is not None:
        common["event_class"] = event_class
    if opts.ha:
        # HATransport takes over longer outages (outbox, replay): fail over to it quickly.
        common["publish_timeout"] = HA_INNER_PUBLISH_TIMEOUT
    mode = _mode("redis", opts)
    if mode == "pubsub" and not topic_modes:
        return RedisPubSubTransport(backend_url, **common)
    policy = _policy(opts)
    if policy is not None:
        common["policy"] = policy
    if not topic_modes:
        return RedisStreamsTransport(backend_url, **common)
    try:
        ModeRouter(mode, topic_modes)  # checked first, so that errors name the URL option
    except ConfigurationError as exc:
        names = " / ".join(sorted({f"{m}_topics" for m in topic_modes.values()}))
        raise ConfigurationError(f"option {names}: {exc}") from None
    return RedisTransport(backend_url, mode=mode, topic_modes=topic_modes, **common)


def _nats(url: str, opts: TransportOptions, rest: list[tuple[str, str]], event_class: Any) -> Any:
    from loom_ha.event import EventCodec
    from loom_ha.nats import JetStreamTransport, NatsCoreTransport

    if rest:
        raise ConfigurationError(f"unknown NATS URL option(s): {', '.join(k for k, _ in rest)}")
    servers = [s if "://" in s else f"nats://{s}" for s in url.split("?")[0].split(",") if s]
    common: dict[str, Any] = {"group_rule": opts.group_rule}
    if event_class is not None:
        common["codec"] = EventCodec(event_class)
    if _mode("nats", opts) == "core":
        return NatsCoreTransport(servers, **common)
    if opts.ha:
        common["publish_timeout"] = HA_INNER_PUBLISH_TIMEOUT
    policy = _policy(opts)
    if policy is not None:
        from loom_ha.nats.options import ConsumerOptions

        common["consumer"] = ConsumerOptions(policy=policy)
    return JetStreamTransport(servers, **common)


def _dedup(opts: TransportOptions, url: str, scheme: str) -> DedupWindow | bool:
    if opts.dedup == "off":
        return False
    if opts.dedup == "memory":
        return MemoryDedup(ttl=opts.dedup_ttl)
    redis_url = opts.dedup_url or (url.split("?")[0] if scheme in ("redis", "rediss") else None)
    if redis_url is None:
        raise ConfigurationError("dedup=redis needs dedup_url=redis://... for this transport")
    from loom_ha.redis import RedisDedup

    return RedisDedup(redis_url, ttl=opts.dedup_ttl)


def create_transport(url: str, *, event_class: Any = None) -> Transport:
    """Build the transport a URL describes (wrapped in `HATransport` unless ``ha=false``).

    Args:
        url: ``memory://``, ``redis://``, ``rediss://``, ``redis+sentinel://``, or one or
            more comma-separated ``nats://`` / ``tls://`` servers; options in the query
            string (see docs/configuration.md).
        event_class: the class received events are built as (Loom's under LoomApp).

    Raises:
        ConfigurationError: the URL, its scheme or an option is invalid; the message
            names the offending part.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"transport URL {url!r} has no scheme (memory://, redis://, nats://)"
        )
    scheme = url.split("://", 1)[0].lower()
    try:
        query = urlsplit(url.split(",")[-1] if scheme in NATS_SCHEMES else url).query
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ConfigurationError(f"transport URL {url!r}: bad query string ({exc})") from None
    opts, rest = _parse_options(pairs)
    inner: Callable[[], Transport]
    if scheme == "memory":
        if rest:
            raise ConfigurationError(
                f"unknown memory:// option(s): {', '.join(k for k, _ in rest)}"
            )
        _mode("memory", opts)
        rule = opts.group_rule
        inner = lambda: InMemoryTransport(group_rule=rule)  # noqa: E731
    elif scheme in REDIS_SCHEMES:
        inner = lambda: _redis(url, opts, rest, event_class)  # noqa: E731
    elif scheme in NATS_SCHEMES:
        inner = lambda: _nats(url, opts, rest, event_class)  # noqa: E731
    else:
        raise ConfigurationError(
            f"transport URL scheme {scheme!r} is not one of memory, redis, rediss, "
            "redis+sentinel, nats, tls"
        )
    first = inner()  # validates backend options now, not at the first reconnect
    if not opts.ha:
        return first
    built = iter([first])
    return HATransport(
        lambda: next(built, None) or inner(),
        outbox=opts.outbox,
        dedup=_dedup(opts, url, scheme),
    )


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
