"""URL parsing and option validation of the Redis transports (no server needed)."""

from __future__ import annotations

import pytest

from loom_ha.errors import ConfigurationError
from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport, parse_redis_url
from loom_ha.spec import parse_transport_url


def test_plain_url_with_acl_credentials() -> None:
    """A redis:// URL yields host, port, db and percent-decoded ACL credentials."""
    s = parse_redis_url("redis://app:p%40ss@10.0.0.1:6380/3")
    assert s.addresses == (("10.0.0.1", 6380),)
    assert (s.username, s.password, s.db, s.tls, s.sentinel) == ("app", "p@ss", 3, False, False)


def test_tls_url_reads_ssl_options() -> None:
    """rediss:// turns TLS on and query options configure it."""
    s = parse_redis_url("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required&pool_size=5")
    assert s.tls and s.ssl_ca_certs == "/ca.pem" and s.pool_size == 5
    assert s.addresses == (("h", 6379),)


def test_sentinel_url_lists_every_sentinel() -> None:
    """redis+sentinel:// takes several hosts, a master name and an optional db."""
    s = parse_redis_url("redis+sentinel://:pw@a:1,b,[::1]:3/mymaster/2")
    assert s.addresses == (("a", 1), ("b", 26379), ("::1", 3))
    assert (s.master_name, s.db, s.password, s.sentinel) == ("mymaster", 2, "pw", True)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("http://h", "scheme"),
        ("redis://h:port/0", "port"),
        ("redis://h:70000/0", "port"),
        ("redis://h/x", "db"),
        ("redis://a,b/0", "redis\\+sentinel"),
        ("redis+sentinel://a:1", "master name"),
        ("redis://h/0?bogus=1", "bogus"),
        ("redis://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("redis://h/0?pool_size=0", "pool_size"),
        ("localhost:6379", "scheme"),
    ],
)
def test_bad_urls_name_the_bad_part(url: str, names: str) -> None:
    """A bad URL raises ConfigurationError whose message names the offending part."""
    with pytest.raises(ConfigurationError, match=names):
        parse_redis_url(url)


def test_explicit_sentinel_arguments() -> None:
    """sentinels= and master_name= build Sentinel settings; mixing with a URL is refused."""
    t = RedisPubSubTransport(sentinels=[("h1", 5000), ("h2", 5001)], master_name="m")
    assert t.settings.master_name == "m" and len(t.settings.addresses) == 2
    with pytest.raises(ConfigurationError, match="not both"):
        RedisPubSubTransport("redis://h", sentinels=[("h1", 1)], master_name="m")
    with pytest.raises(ConfigurationError, match="master_name"):
        RedisStreamsTransport(sentinels=[("h1", 1)])


def test_bad_transport_options_fail_at_construction() -> None:
    """Nonsense timeouts and sizes fail when the transport is built, naming the option."""
    with pytest.raises(ConfigurationError, match="claim_idle"):
        RedisStreamsTransport("redis://h", claim_idle=0)
    with pytest.raises(ConfigurationError, match="publish_timeout"):
        RedisPubSubTransport("redis://h", publish_timeout=-1)
    with pytest.raises(ConfigurationError, match="wait_replicas"):
        RedisStreamsTransport("redis://h", wait_replicas=-1)


def test_sentinel_defaults_to_waiting_for_a_replica() -> None:
    """Streams mode waits for one replica with Sentinel and for none on a single server."""
    assert RedisStreamsTransport("redis+sentinel://a/m").wait_replicas == 1
    assert RedisStreamsTransport("redis://a").wait_replicas == 0


def test_silence_bound_and_probe_interval_come_from_the_url() -> None:
    """socket_timeout (2 s by default) bounds a silent server; the probe runs 4 times within it
    unless probe_interval says otherwise; both are URL options."""
    assert parse_redis_url("redis://h").socket_timeout == 2.0
    assert parse_redis_url("redis://h").liveness_interval == 0.5
    s = parse_redis_url("redis+sentinel://a/m?socket_timeout=1&probe_interval=0.1")
    assert (s.socket_timeout, s.liveness_interval) == (1.0, 0.1)
    spec = parse_transport_url("redis+sentinel://a/m?mode=streams&socket_timeout=1")
    assert RedisStreamsTransport(spec.backend_url).settings.socket_timeout == 1.0


@pytest.mark.parametrize(
    ("url", "options", "names"),
    [
        ("redis://h?probe_interval=2", {}, "probe_interval"),  # not below socket_timeout
        ("redis://h?probe_interval=0", {}, "probe_interval"),
        ("redis://h?socket_timeout=0", {}, "socket_timeout"),
        ("redis://h", {"probe_interval": 3.0}, "probe_interval"),
        # XADD + WAIT may take wait_timeout: a shorter socket_timeout would call it dead.
        ("redis+sentinel://a/m?socket_timeout=1", {"wait_timeout": 1.0}, "wait_timeout"),
    ],
)
def test_a_silence_bound_that_cannot_work_is_refused(
    url: str, options: dict[str, float], names: str
) -> None:
    """Probe intervals and WAIT timeouts that do not fit inside socket_timeout are refused."""
    with pytest.raises(ConfigurationError, match=names):
        RedisStreamsTransport(url, **options)
