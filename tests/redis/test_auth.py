"""Credentials enforced by real servers: ACL users on the servers, auth on the sentinels, TLS.

Refused credentials, a missing permission or an untrusted certificate each end in one
non-retried `TransportError` naming the cause; the servers' own counters show that
nothing was tried twice. `APP_RULES` is the least-privilege user docs/redis.md documents,
and `test_the_least_privilege_user_runs_every_path` shows it is enough.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis.exceptions as rex

from loom_ha.config import create_transport
from loom_ha.errors import LoomHAError, TransientError, TransportError
from loom_ha.event import CloudEvent
from loom_ha.ha.failover import HATransport
from loom_ha.policy import DeliveryPolicy
from loom_ha.redis import RedisDedup, RedisPubSubTransport, RedisStreamsTransport
from loom_ha.redis._errors import translate
from loom_ha.testing._tls import make_test_certificates
from loom_ha.testing.collect import Collector, collectors, publish_markers
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.redis_sentinel import RedisSentinel, RedisSentinelCluster
from loom_ha.testing.redis_servers import RedisServer, acl_user
from loom_ha.transport import Transport

from ._redis_helpers import eventually

pytestmark = pytest.mark.redis

APP_RULES = (
    "resetkeys ~loom:* resetchannels &* -@all "
    "+ping +role +time +client|id +client|unblock "
    "+publish +subscribe +psubscribe +unsubscribe +punsubscribe "
    "+xadd +xread +xreadgroup +xack +xautoclaim +xclaim +xpending +xrevrange +xgroup|create "
    "+sadd +smembers +wait +set +get +del +pexpire"
)
"""What loom-ha's transports and `RedisDedup` need, keys and channels under ``loom:``."""
SENTINEL_RULES = (
    "resetchannels &+switch-master -@all "
    "+ping +subscribe +sentinel|get-master-addr-by-name +sentinel|master"
)
"""What a loom-ha client needs of a sentinel."""
HANG = 60.0  # s: far beyond any answer (milliseconds); only a retry loop gets there
ADMIN_PW, SENTINEL_ADMIN_PW = "admin-pw", "sentinel-admin-pw"
APP_PW, LOOM_PW, WRONG = "app-pw:1/é", "loom-sentinel-pw", "wrong-pw"


def _event(n: int) -> CloudEvent:
    return CloudEvent.create(source="/auth", type="auth", data={"n": n})


def _acl_cluster() -> RedisSentinelCluster:
    """Servers for admin (replication, sentinels) and app; sentinels for peers and loom."""
    return RedisSentinelCluster(
        username="admin",
        password=ADMIN_PW,
        sentinel_username="sentinel-admin",
        sentinel_password=SENTINEL_ADMIN_PW,
        extra_config=[acl_user("app", APP_PW, APP_RULES)],
        sentinel_extra_config=[acl_user("loom", LOOM_PW, SENTINEL_RULES)],
    )


def _url(
    cluster: RedisSentinelCluster,
    *,
    user: str | None = "app",
    password: str | None = APP_PW,
    sentinel_user: str | None = "loom",
    sentinel_password: str | None = LOOM_PW,
    mode: str = "streams",
) -> str:
    hosts = ",".join(f"{h}:{p}" for h, p in cluster.sentinel_addresses)
    creds = f"{quote(user or '', safe='')}:{quote(password, safe='')}@" if password else ""
    query = f"mode={mode}"
    if sentinel_password is not None:
        query += f"&sentinel_username={sentinel_user}&sentinel_password={quote(sentinel_password)}"
    return f"redis+sentinel://{creds}{hosts}/{cluster.master_name}?{query}"


def _stats(member: RedisServer | RedisSentinel, section: str) -> dict[str, str]:
    reply = member.command("INFO", section)
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _refused(server: RedisServer, error: str) -> int:
    """How many commands `server` answered with `error` (WRONGPASS, NOAUTH, NOPERM)."""
    field = _stats(server, "errorstats").get(f"errorstat_{error}", "count=0")
    return int(field.split(",")[0].removeprefix("count="))


def _error_replies(member: RedisServer | RedisSentinel) -> int:
    """Every error reply of `member` (a sentinel has no INFO errorstats)."""
    return int(_stats(member, "stats")["total_error_replies"])


def _acl_log(server: RedisServer) -> list[str]:
    """What `server` refused (ACL LOG), as ``reason object user`` lines."""
    entries: Any = server.command("ACL", "LOG")
    lines = []
    for entry in entries:
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        lines.append(b" ".join(fields[k] for k in (b"reason", b"object", b"username")).decode())
    return lines


async def _connect_error(transport: Transport) -> LoomHAError:
    """The error `connect()` raises; a retry loop (HATransport never gives up on a transient
    error) fails the test after `HANG` seconds instead of hanging it."""
    try:
        async with asyncio.timeout(HANG):
            await transport.connect()
    except LoomHAError as exc:
        return exc
    finally:
        await transport.disconnect()
    raise AssertionError("connect() succeeded")


@pytest.mark.chaos
@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["pubsub", "streams"])
async def test_acl_users_follow_a_failover(server_launcher: ServerLauncher, mode: str) -> None:
    """A least-privilege app user and an authenticated sentinel user, given in the URL,
    deliver before and after the master is killed: the new master takes the same
    credentials and refuses none of the app's commands."""
    cluster = await asyncio.to_thread(server_launcher.start, _acl_cluster())
    got = Collector()
    async with create_transport(_url(cluster, mode=mode)) as transport:
        await transport.subscribe("auth/x", got)
        await transport.publish("auth/x", _event(0))
        await got.wait_for(1)
        old = await asyncio.to_thread(cluster.master)
        await asyncio.to_thread(old.kill)
        killed = time.monotonic()
        new = await asyncio.to_thread(cluster.wait_for_failover, old.address)
        # Pub/Sub drops what is published while the listener moves: publish until one arrives.
        await publish_markers(transport, "auth/x", got, within=30)
        print(f"\n[auth] {mode}: delivering again {time.monotonic() - killed:.2f}s after the kill")
        assert transport.statistics().endpoint == f"redis://{new.host}:{new.port}/0"
        clients = new.command("CLIENT", "LIST")
        assert isinstance(clients, bytes) and b" user=app " in clients  # loom-ha's, moved
    assert _acl_log(new) == []


async def test_refused_credentials_fail_once(server_launcher: ServerLauncher) -> None:
    """Wrong or missing credentials of the master or of the sentinels: `connect()` raises one
    non-retried TransportError naming the node, and no node was asked twice."""
    cluster = await asyncio.to_thread(server_launcher.start, _acl_cluster())
    master = await asyncio.to_thread(cluster.master)
    cases = {
        "wrong master password": ({"password": WRONG}, "redis", "WRONGPASS"),
        "unknown master user": ({"user": "nobody"}, "redis", "WRONGPASS"),
        "no master credentials": ({"password": None}, "redis", "NOAUTH"),
        "wrong sentinel password": ({"sentinel_password": WRONG}, "sentinel", "WRONGPASS"),
        "no sentinel credentials": ({"sentinel_password": None}, "sentinel", None),
    }
    for mode in ("pubsub", "streams"):
        for case, (parts, node, error) in cases.items():
            refused = _refused(master, "WRONGPASS"), _refused(master, "NOAUTH")
            errors = [_error_replies(s) for s in cluster.sentinels]
            started = time.monotonic()
            exc = await _connect_error(create_transport(_url(cluster, mode=mode, **parts)))  # type: ignore[arg-type]
            print(f"\n[auth] {mode}, {case}: {time.monotonic() - started:.3f}s: {exc}")
            assert type(exc) is TransportError and not isinstance(exc, TransientError), case
            assert str(exc).startswith(f"{node} ") and "credentials" in str(exc), case
            if node == "redis":  # asked once
                after = _refused(master, "WRONGPASS"), _refused(master, "NOAUTH")
                assert after[error == "NOAUTH"] == refused[error == "NOAUTH"] + 1, case
            elif error == "WRONGPASS":  # each sentinel asked once at most (all at once)
                now = [_error_replies(s) for s in cluster.sentinels]
                more = [a - b for a, b in zip(now, errors, strict=True)]
                assert max(more) == 1 and min(more) >= 0, case


async def test_a_missing_permission_is_named(server_launcher: ServerLauncher) -> None:
    """A user without XADD cannot publish to streams, one without the channel cannot
    subscribe: each gets one TransportError naming what Redis refused, not retried, and
    the Pub/Sub listener keeps its connection and its other subscriptions."""
    no_xadd = APP_RULES + " -xadd"
    narrow = APP_RULES.replace("resetchannels &*", "resetchannels &loom:allowed/*")
    server = await asyncio.to_thread(
        server_launcher.start,
        RedisServer(
            username="admin",
            password=ADMIN_PW,
            extra_config=[acl_user("noxadd", APP_PW, no_xadd), acl_user("narrow", APP_PW, narrow)],
        ),
    )
    base = f"redis://{{}}:{quote(APP_PW, safe='')}@{server.host}:{server.port}/0"
    async with RedisStreamsTransport(base.format("noxadd")) as streams:
        with pytest.raises(TransportError, match="'xadd'") as info:
            await streams.publish("acl/x", _event(1))
        assert not isinstance(info.value, TransientError)
    assert _refused(server, "NOPERM") == 1
    got = Collector()
    async with RedisPubSubTransport(base.format("narrow")) as pubsub:
        await pubsub.subscribe("allowed/x", got)
        with pytest.raises(TransportError, match=r"PSUBSCRIBE 'loom:other/\*'") as info:
            await pubsub.subscribe("other/*", Collector())
        assert not isinstance(info.value, TransientError) and "refused" in str(info.value)
        await pubsub.publish("allowed/x", _event(2))
        await got.wait_for(1)
        assert (pubsub.statistics().extra or {})["listener_reconnects"] == 0
    assert _refused(server, "NOPERM") == 2
    async with create_transport(base.format("narrow") + "?mode=pubsub") as ha:
        with pytest.raises(TransportError, match="SUBSCRIBE 'loom:other/x'") as info:
            await ha.subscribe("other/x", Collector())
        assert not isinstance(info.value, TransientError)
    assert _refused(server, "NOPERM") == 3


@pytest.mark.parametrize(
    ("missing", "group"), [("xreadgroup", "g"), ("xack", "g"), ("xread", None)]
)
async def test_a_missing_read_permission_fails_the_subscribe(
    server_launcher: ServerLauncher, missing: str, group: str | None
) -> None:
    """A Streams user that may not read (or acknowledge) what it subscribes to gets one
    TransportError naming the command at subscribe, not a consumer that logs a refusal
    every second and delivers nothing; the failed subscription leaves nothing behind."""
    server = await asyncio.to_thread(
        server_launcher.start,
        RedisServer(
            username="admin",
            password=ADMIN_PW,
            extra_config=[acl_user("app", APP_PW, f"{APP_RULES} -{missing}")],
        ),
    )
    url = f"redis://app:{quote(APP_PW, safe='')}@{server.host}:{server.port}/0"
    async with RedisStreamsTransport(url) as streams:
        with pytest.raises(TransportError, match=f"'{missing}'") as info:
            await streams.subscribe("acl/x", Collector(), group=group)
        assert not isinstance(info.value, TransientError)
        stats = streams.statistics()
        assert (stats.subscriptions, (stats.extra or {})["consumers"]) == (0, 0)
    assert _refused(server, "NOPERM") == 1  # refused once: not retried


async def _exercise(url: str) -> None:
    """Cause every command loom-ha sends to a master that is not behind Sentinel."""
    async with RedisPubSubTransport(url) as pubsub:
        exact, wild = collectors("exact", "wild")
        await pubsub.subscribe("acl/x", exact)
        await pubsub.subscribe("acl/*", wild)
        await pubsub.publish("acl/x", _event(1))
        await exact.wait_for(1)
        await wild.wait_for(1)
        await pubsub.unsubscribe("acl/x", exact)
        await pubsub.unsubscribe("acl/*", wild)
    # A retry backs off past claim_idle and reads end often: a sweep reclaims (XAUTOCLAIM,
    # XPENDING) the entry, the retry takes it back (XCLAIM).
    policy = DeliveryPolicy(max_deliveries=2, backoff_initial=1.0, backoff_max=1.0)
    streams = RedisStreamsTransport(url, claim_idle=0.3, block=0.2, policy=policy)
    async with HATransport(streams, dedup=RedisDedup(url, ttl=5, lease=0.3)) as ha:
        fan, wild, group = collectors("fan-out", "wildcard", "group")

        async def slow(event: CloudEvent) -> None:  # outlives lease / 3: renewed (PEXPIRE)
            await asyncio.sleep(0.4)
            await group(event)

        async def fails(event: CloudEvent) -> None:  # released (DEL), then dead-lettered
            raise RuntimeError("refused on purpose")

        await ha.subscribe("acl/s", fan)
        await ha.subscribe("acl/*", wild)
        await ha.subscribe("acl/g", slow, group="g")
        await ha.subscribe("acl/dead", fails, group="d")
        twice = _event(3)
        for topic, event in (("acl/s", _event(2)), ("acl/g", twice), ("acl/g", twice)):
            await ha.publish(topic, event)  # the second `twice`: a duplicate (GET)
        await ha.publish("acl/dead", _event(4))
        await fan.wait_for(1)
        await group.wait_for(1)
        await wild.wait_until(lambda: len(wild.events) >= 3, what=lambda: "wildcard")
        await ha.wait_connected()
        await streams.unsubscribe("acl/s", fan)  # wakes its blocked read (CLIENT UNBLOCK)
        await eventually(lambda: streams.statistics().dead_lettered == 1, within=15)
        # The group's (the shared window: GET) and the wildcard's (an in-process window).
        assert ha.statistics().duplicates_dropped == 2


async def test_the_least_privilege_user_runs_every_path(server_launcher: ServerLauncher) -> None:
    """`APP_RULES` lets Pub/Sub, Streams (fan-out, wildcards, groups, reclaiming, dead
    letters) and the shared dedup window run: the server refuses nothing."""
    server = await asyncio.to_thread(
        server_launcher.start,
        RedisServer(
            username="admin", password=ADMIN_PW, extra_config=[acl_user("app", APP_PW, APP_RULES)]
        ),
    )
    await _exercise(f"redis://app:{quote(APP_PW, safe='')}@{server.host}:{server.port}/0")
    assert _acl_log(server) == []
    ran = {k.removeprefix("cmdstat_") for k in _stats(server, "commandstats")}
    needed = {rule[1:] for rule in APP_RULES.split() if rule.startswith("+")}
    # Only with Sentinel: ROLE (the probe) and WAIT (wait_replicas); CLIENT UNBLOCK only when
    # a stopped reader happens to be blocked (test_acl_users_follow_a_failover runs them).
    assert needed - ran == {"role", "wait", "client|unblock"} - ran


def test_docs_show_the_rules() -> None:
    """docs/redis.md shows the ACL rules these tests prove sufficient."""
    doc = " ".join((Path(__file__).parents[2] / "docs" / "redis.md").read_text().split())
    assert " ".join(APP_RULES.split()) in doc
    assert " ".join(SENTINEL_RULES.split()) in doc


async def test_a_certificate_from_another_ca_is_refused_at_once(
    server_launcher: ServerLauncher, tmp_path: Path
) -> None:
    """``rediss://`` with `ssl_ca_certs` of another CA: one non-retried TransportError
    naming certificate verification (a transient one was retried forever by HATransport)."""
    server = await asyncio.to_thread(
        server_launcher.redis, tls=True, username="app", password=APP_PW
    )
    other_ca = make_test_certificates(tmp_path).ca_file
    url = f"{server.url}?ssl_ca_certs={quote(str(other_ca))}"
    bare = RedisPubSubTransport(server.url, ssl_ca_certs=str(other_ca))
    for transport in (create_transport(url), bare):
        exc = await _connect_error(transport)
        assert type(exc) is TransportError and not isinstance(exc, TransientError)
        assert "TLS certificate verification failed" in str(exc)
        assert "CERTIFICATE_VERIFY_FAILED" in str(exc)


def test_certificate_errors_are_not_transient() -> None:
    """redis-py reports a failed verification as a ConnectionError: it is mapped to a
    non-transient TransportError, other connection errors stay transient."""
    try:
        raise rex.ConnectionError("Error 1 connecting") from ssl.SSLCertVerificationError(1, "x")
    except rex.ConnectionError as exc:
        mapped = translate(exc, "op")
    assert type(mapped) is TransportError and "certificate verification" in str(mapped)
    assert isinstance(translate(rex.ConnectionError("reset"), "op"), TransientError)


@pytest.mark.parametrize("secret", ["auth_pass", "password"])
def test_sentinel_passwords_with_spaces_are_refused(secret: str) -> None:
    """Sentinel's CONFIG REWRITE (Redis 7.0) writes passwords unquoted, so one with a space
    would stop the sentinel from starting again: the launcher refuses it at once."""
    with pytest.raises(ValueError, match=secret):
        RedisSentinel(master_name="m", master=("127.0.0.1", 1), **{secret: "two words"})  # type: ignore[arg-type]
