"""A transport URL parsed once into a typed `TransportSpec`: what config, dedup and routing read.

    memory://
    redis://host:6379/0?mode=pubsub&outbox=fail_fast
    redis+sentinel://s1:26379,s2:26379/mymaster?pubsub_topics=node.response/*
    nats://n1:4222,nats://n2:4222?mode=core

loom-ha's own options ride in the query string; anything else in it is left to the backend
(Redis' ``db``, say). A bad URL or option raises `ConfigurationError` naming it, before
anything connects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from loom_ha._redact import redact
from loom_ha.errors import ConfigurationError
from loom_ha.ha.outbox import OutboxConfig, OutboxPolicy
from loom_ha.policy import DeliveryPolicy
from loom_ha.transport import GroupRule, loom_request_groups

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
NATS_SCHEMES = ("nats", "tls")
MODES = {"redis": ("streams", "pubsub"), "nats": ("jetstream", "core"), "memory": ("memory",)}
"""Modes per broker; the first is the default (durable where the broker offers it)."""

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


Broker = Literal["memory", "redis", "nats"]


@dataclass(frozen=True)
class TransportSpec:
    """Everything a transport URL says, validated.

    Attributes:
        url: the URL as given.
        scheme: its scheme, lower case.
        broker: ``memory``, ``redis`` or ``nats``.
        mode: the delivery mode, the broker's default filled in (``streams``, ``pubsub``,
            ``jetstream``, ``core``, ``memory``).
        options: loom-ha's options (HA, outbox, dedup, group rule, deliveries).
        address: the URL without its query (Redis: one URL; NATS: the server list).
        servers: NATS server URLs (empty for other brokers).
        backend_options: query options left to the backend, in order (Redis' own; NATS
            connection options such as ``ping_interval``, see `loom_ha.nats.URL_OPTIONS`).
        topic_modes: Redis per-pattern modes (``pubsub_topics=`` / ``streams_topics=``).
    """

    url: str
    scheme: str
    broker: Broker
    mode: str
    options: TransportOptions
    address: str
    servers: tuple[str, ...] = ()
    backend_options: tuple[tuple[str, str], ...] = ()
    topic_modes: dict[str, str] = field(default_factory=dict)

    @property
    def durable(self) -> bool:
        """At-least-once delivery (Streams, JetStream) for topics in the default mode."""
        return self.mode in ("streams", "jetstream")

    @property
    def backend_url(self) -> str:
        """The Redis URL for the backend: the address and the backend's own options."""
        parts = urlsplit(self.address)
        return urlunsplit(parts._replace(query=urlencode(list(self.backend_options))))

    @property
    def delivery_policy(self) -> DeliveryPolicy | None:
        """The redelivery budget the URL asks for (``max_deliveries=``), if any."""
        n = self.options.max_deliveries
        return DeliveryPolicy(max_deliveries=n) if n else None


def parse_transport_url(url: str) -> TransportSpec:
    """Parse and validate `url` once.

    Raises:
        ConfigurationError: the URL, its scheme or an option is invalid (named).
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"transport URL {redact(url, url)!r} has no scheme (memory://, redis://, nats://)"
        )
    scheme = url.split("://", 1)[0].lower()
    broker: Broker
    if scheme == "memory":
        broker = "memory"
    elif scheme in REDIS_SCHEMES:
        broker = "redis"
    elif scheme in NATS_SCHEMES:
        broker = "nats"
    else:
        raise ConfigurationError(
            f"transport URL scheme {scheme!r} is not one of memory, "
            f"{', '.join(REDIS_SCHEMES)}, {', '.join(NATS_SCHEMES)}"
        )
    # NATS lists servers separated by commas; the query follows the last one.
    address, _, query = url.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        # The query only (the address may carry credentials), its secret options hidden.
        raise ConfigurationError(
            f"transport URL query {redact(query, url)!r}: bad ({exc})"
        ) from None
    opts, rest = _parse_options(pairs)
    mode = _mode(broker, opts)
    servers: tuple[str, ...] = ()
    topic_modes: dict[str, str] = {}
    if broker == "memory" and rest:
        raise ConfigurationError(f"unknown memory:// option(s): {', '.join(k for k, _ in rest)}")
    if broker == "nats":  # connection options stay in backend_options (loom_ha.nats checks them)
        servers = tuple(s if "://" in s else f"nats://{s}" for s in address.split(",") if s)
    if broker == "redis":
        topic_modes, rest = _redis_topic_modes(rest)
    return TransportSpec(
        url=url,
        scheme=scheme,
        broker=broker,
        mode=mode,
        options=opts,
        address=address,
        servers=servers,
        backend_options=tuple(rest),
        topic_modes=topic_modes,
    )
