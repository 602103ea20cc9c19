"""The one-line switch: URLs and environment variables build the right transport."""

from __future__ import annotations

import pytest

from loom_ha.config import create_transport, transport_from_env
from loom_ha.errors import ConfigurationError
from loom_ha.ha import HATransport, OutboxPolicy
from loom_ha.memory import InMemoryTransport
from loom_ha.nats import JetStreamTransport, NatsCoreTransport, NatsDedup
from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport
from loom_ha.routing.config import _shared_dedup
from loom_ha.spec import parse_transport_url


@pytest.mark.parametrize(
    ("url", "inner"),
    [
        ("memory://", InMemoryTransport),
        ("redis://127.0.0.1:6390/0", RedisStreamsTransport),
        ("redis://127.0.0.1:6390/0?mode=pubsub", RedisPubSubTransport),
        ("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster?mode=streams", RedisStreamsTransport),
        ("rediss+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster?mode=pubsub", RedisPubSubTransport),
        ("nats://127.0.0.1:1,nats://127.0.0.1:2", JetStreamTransport),
        ("nats://127.0.0.1:1,127.0.0.1:2?mode=core", NatsCoreTransport),
    ],
)
async def test_urls_pick_backend_and_mode(url: str, inner: type) -> None:
    """Each URL form builds an HATransport around the backend and mode it names."""
    transport = create_transport(url)
    assert isinstance(transport, HATransport)
    assert isinstance(transport.inner, inner)


async def test_options_reach_the_ha_layer() -> None:
    """Outbox policy and ha=false are read from the query string."""
    transport = create_transport("memory://?outbox=fail_fast&outbox_size=5&dedup=off")
    assert isinstance(transport, HATransport)
    assert transport.outbox_config.policy is OutboxPolicy.FAIL_FAST
    assert transport.capabilities.dedup is False
    assert isinstance(create_transport("memory://?ha=false"), InMemoryTransport)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("localhost:6379", "no scheme"),
        ("amqp://x", "amqp"),
        ("memory://?mode=streams", "mode"),
        ("redis://h:1?mode=jetstream", "mode"),
        ("memory://?outbox=maybe", "outbox"),
        ("memory://?outbox_size=lots", "outbox_size"),
        ("memory://?outbox_size=0", "max_size"),
        ("memory://?colour=blue", "colour"),
        ("nats://h:1?colour=blue", "colour"),
        ("nats://h:1?dedup=redis", "dedup_url"),
        ("redis://h:notaport", "port"),
    ],
)
def test_bad_urls_fail_at_construction_naming_the_part(url: str, named: str) -> None:
    """A bad scheme, option or value raises ConfigurationError that names it."""
    with pytest.raises(ConfigurationError, match=named):
        create_transport(url)


def test_environment_follows_loom_variables() -> None:
    """LOOM_TRANSPORT, REDIS_URL, NATS_SERVERS and LOOM_HA_OPTIONS pick transport and options."""
    assert isinstance(transport_from_env({}).inner, InMemoryTransport)  # type: ignore[attr-defined]
    redis = transport_from_env(
        {
            "LOOM_TRANSPORT": "redis",
            "REDIS_URL": "redis://127.0.0.1:6390",
            "LOOM_HA_OPTIONS": "mode=pubsub",
        }
    )
    assert isinstance(redis.inner, RedisPubSubTransport)  # type: ignore[attr-defined]
    nats = transport_from_env(
        {"LOOM_TRANSPORT": "nats", "NATS_SERVERS": "nats://127.0.0.1:1,nats://127.0.0.1:2"}
    )
    assert isinstance(nats.inner, JetStreamTransport)  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="LOOM_TRANSPORT"):
        transport_from_env({"LOOM_TRANSPORT": "kafka"})


@pytest.mark.parametrize(
    ("url", "broker", "mode", "address", "servers", "backend_options"),
    [
        ("memory://", "memory", "memory", "memory://", (), ()),
        (
            "redis://h:1/0?db=2&outbox=fail_fast",
            "redis",
            "streams",
            "redis://h:1/0",
            (),
            (("db", "2"),),
        ),
        ("rediss://h:1?mode=pubsub", "redis", "pubsub", "rediss://h:1", (), ()),
        (
            "nats://a:1,b:2?mode=core",
            "nats",
            "core",
            "nats://a:1,b:2",
            ("nats://a:1", "nats://b:2"),
            (),
        ),
    ],
)
def test_a_url_is_parsed_once_into_a_spec(
    url: str,
    broker: str,
    mode: str,
    address: str,
    servers: tuple[str, ...],
    backend_options: tuple[tuple[str, str], ...],
) -> None:
    """Config, dedup and routing all read the same typed spec of the URL."""
    spec = parse_transport_url(url)
    assert (spec.broker, spec.mode, spec.address) == (broker, mode, address)
    assert (spec.servers, spec.backend_options) == (servers, backend_options)
    assert spec.durable is (mode in ("streams", "jetstream"))


def test_a_shared_dedup_url_is_parsed_like_a_transport_url() -> None:
    """``LOOM_HA_DEDUP_URL`` goes through the one URL parser: a scheme-less second server and
    a query string are understood, and a broker that cannot hold a window is named."""
    window = _shared_dedup({"LOOM_HA_DEDUP_URL": "nats://127.0.0.1:1,127.0.0.1:2?x=1"}, "", 4.0)
    assert isinstance(window, NatsDedup)
    assert window.options.servers == ("nats://127.0.0.1:1", "nats://127.0.0.1:2")
    with pytest.raises(ConfigurationError, match="memory://"):
        _shared_dedup({"LOOM_HA_DEDUP_URL": "memory://"}, "", 4.0)
