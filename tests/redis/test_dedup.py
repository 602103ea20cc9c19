"""RedisDedup: shared by instances, leases renew and lapse, retries are safe, failovers followed."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from loom_ha.errors import ConfigurationError
from loom_ha.redis import RedisDedup
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import RedisSentinelCluster, RedisServer

from ._redis_helpers import eventually, eventually_async, while_frozen

pytestmark = pytest.mark.redis


def _prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


async def test_redis_window_is_shared_between_instances(redis_server: Any) -> None:
    """Two processes' windows on one Redis agree: only one claims an event."""
    prefix = _prefix()
    first = RedisDedup(redis_server.url, ttl=5, prefix=prefix)
    second = RedisDedup(redis_server.url, ttl=5, prefix=prefix)
    try:
        assert await first.claim("k")
        assert not await second.claim("k")
        assert not await first.claim("k")  # its own window too: one handler at a time
        await first.release("k")
        assert await second.claim("k")
    finally:
        await first.close()
        await second.close()


# A lease long enough that a scheduling stall cannot let a renewed claim lapse: renewals
# come every LEASE / 3, so the claim survives any stall shorter than 2/3 * LEASE = 2 s.
LEASE = 3.0


async def test_redis_lease_is_renewed_while_running_and_lapses_when_the_owner_dies(
    redis_server: Any,
) -> None:
    """A running handler keeps its claim past the lease; a dead owner's claim lapses."""
    prefix = _prefix()
    owner = RedisDedup(redis_server.url, ttl=30, lease=LEASE, prefix=prefix)
    dying = RedisDedup(redis_server.url, ttl=30, lease=LEASE, prefix=prefix)
    other = RedisDedup(redis_server.url, ttl=30, lease=LEASE, prefix=prefix)
    try:
        assert await dying.claim("done")
        await dying.complete("done")
        assert await dying.claim("orphan")
        await dying.close()  # the owner "dies" mid-handler: no complete, no release
        assert await owner.claim("running")
        assert not await other.claim("orphan")  # its lease still runs
        # One wait longer than a lease covers all three: without renewals "running" would
        # have lapsed, and "orphan", whose renewals stopped when `dying` closed (before
        # this sleep), has. asyncio.sleep never returns early; the 0.5 s covers Redis
        # expiring by its own (millisecond) clock. Not a synchronisation: the time passing
        # is what is tested.
        await asyncio.sleep(LEASE + 0.5)
        assert not await other.claim("running")  # only the renewal kept it
        # Completed, then its owner died: kept for the ttl, though nobody renews it.
        assert not await other.claim("done")
        assert await other.claim("orphan")
    finally:
        await owner.close()
        await dying.close()
        await other.close()


def test_redis_window_rejects_a_lease_longer_than_the_ttl() -> None:
    """A bad lease fails at construction, naming both numbers."""
    with pytest.raises(ConfigurationError, match="lease"):
        RedisDedup("redis://127.0.0.1:1", ttl=1, lease=5)


def test_redis_window_rejects_a_bad_url() -> None:
    """The URL is parsed at construction, as the transports parse theirs."""
    with pytest.raises(ConfigurationError, match="scheme"):
        RedisDedup("http://127.0.0.1:6379")
    with pytest.raises(ConfigurationError, match="master name"):
        RedisDedup("redis+sentinel://127.0.0.1:26379")


async def test_close_leaves_no_task_or_client_behind(server_launcher: ServerLauncher) -> None:
    """`close()` ends the renewer and every connection (the server counts none); idempotent;
    a window that never claimed closes without connecting; a closed window refuses claims."""
    server = await asyncio.to_thread(server_launcher.redis)
    raw = aioredis.Redis.from_url(server.url, protocol=2)

    async def clients() -> int:
        return len(await raw.client_list()) - 1  # less our own

    async def no_clients() -> bool:
        return await clients() == 0

    try:
        tasks_before = asyncio.all_tasks()
        unused = RedisDedup(server.url)
        await unused.close()
        window = RedisDedup(server.url, lease=0.3, prefix=_prefix())
        assert await window.claim("a")
        assert asyncio.all_tasks() - tasks_before  # the renewer
        assert await clients() > 0
        await window.close()
        await window.close()
        assert asyncio.all_tasks() - tasks_before == set()
        # The server notices a closed socket a moment later.
        await eventually_async(no_clients)
        # Closed is not dead: the next use connects again (HATransport.disconnect/connect).
        for closed in (unused, window):
            assert await closed.claim(f"again-{uuid.uuid4().hex}")
            await closed.close()
        assert asyncio.all_tasks() - tasks_before == set()
        await eventually_async(no_clients)
    finally:
        await raw.aclose()


@pytest.mark.chaos
async def test_a_claim_whose_reply_was_lost_is_still_ours(server_launcher: ServerLauncher) -> None:
    """A claim that ran but whose reply timed out is retried and recognised as our own claim,
    not taken for another instance's (which would drop the event unhandled)."""
    server = await asyncio.to_thread(server_launcher.redis)
    prefix = _prefix()
    window = RedisDedup(f"{server.url}?socket_timeout=0.3", prefix=prefix)
    other = RedisDedup(server.url, prefix=prefix)
    try:
        assert await window.claim("warm-up")  # connected: the SET below is written at once
        claimed: list[bool] = []

        async def claim() -> None:
            claimed.append(await window.claim("k"))

        await while_frozen(server, claim())
        assert claimed == [True]
        assert not await other.claim("k")
    finally:
        await window.close()
        await other.close()


# Leases renewed across the failover: renewals every HELD_LEASE / 3 s, so a held claim
# survives a switch during which renewals fail for up to 2/3 * HELD_LEASE = 6.7 s (a SIGKILL
# is noticed after the sentinels' down_after of 1 s, then a replica is elected).
HELD_LEASE = 10.0
# Either switch takes the window a few seconds; its commands retry for up to 30 s
# (COMMAND_POLICY), so anything well under that is "followed".
FOLLOW_BOUND = 15.0


def _promoted(cluster: RedisSentinelCluster, old: tuple[str, int]) -> RedisServer:
    """Block until the sentinels name a master other than `old` that says it is one."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            new = cluster.master()
            if new.address != old and new.info().get("role") == "master":
                return new
        except (ConnectionError, OSError, LookupError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no failover away from {old}")


@pytest.mark.chaos
@pytest.mark.timeout(150)
@pytest.mark.parametrize("switch", ["sentinel-failover", "sigkill"])
async def test_claims_follow_a_sentinel_failover(
    server_launcher: ServerLauncher, switch: str
) -> None:
    """Across a master switch (SENTINEL FAILOVER: the old master lives on as a replica that
    refuses writes; SIGKILL: it is gone) claims, completes and lease renewals keep working
    on the new master: none of the calls made meanwhile fails, each returns within
    FOLLOW_BOUND s, completed events stay duplicates, and a lease held across the switch is
    renewed on the new master."""
    cluster = await asyncio.to_thread(server_launcher.redis_sentinel)
    prefix = _prefix()
    tasks_before = asyncio.all_tasks()
    window = RedisDedup(cluster.url, ttl=60, lease=HELD_LEASE, prefix=prefix)
    other = RedisDedup(cluster.url, ttl=60, lease=HELD_LEASE, prefix=prefix)
    try:
        assert await window.claim("before")
        await window.complete("before")
        assert await window.claim("held")  # a handler still running across the switch
        old = await asyncio.to_thread(cluster.master)
        # Neither switch waits for the replicas: let them have our keys first.
        replicas = str(len(cluster.servers) - 1)
        await asyncio.to_thread(old.command, "WAIT", replicas, "5000")

        calls: list[float] = []  # how long each claim + complete took
        stop = asyncio.Event()

        async def handle_events() -> None:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                assert await window.claim(f"during-{n}")
                await window.complete(f"during-{n}")
                calls.append(time.monotonic() - started)
                n += 1
                await asyncio.sleep(0.01)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(handle_events())
            await eventually(lambda: len(calls) >= 10, within=10)
            switch_at = time.monotonic()
            if switch == "sigkill":
                await asyncio.to_thread(old.kill)
            else:
                await asyncio.to_thread(
                    cluster.sentinels[0].command, "SENTINEL", "FAILOVER", cluster.master_name
                )
            new = await asyncio.to_thread(_promoted, cluster, old.address)
            promoted_at = time.monotonic()
            done_before = len(calls)
            # Calls made after the sentinels named the new master: they run on it.
            await eventually(lambda: len(calls) >= done_before + 10, within=FOLLOW_BOUND)
            stop.set()

        if switch == "sentinel-failover":
            await asyncio.to_thread(cluster.wait_for_failover, old.address)
            assert old.alive and old.info()["role"] == "slave"
        assert max(calls) < FOLLOW_BOUND
        assert not await other.claim("before")  # completed before the switch: a duplicate
        assert await window.claim("after")
        await window.complete("after")
        assert not await other.claim("after")
        # `complete` wrote it for the ttl, on the new master.
        assert int(await asyncio.to_thread(new.command, "PTTL", prefix + "after")) > 30_000

        # The held lease is renewed on the new master: its time to live drops, then rises.
        async def ttl_held() -> int:
            return int(await asyncio.to_thread(new.command, "PTTL", prefix + "held"))

        low = HELD_LEASE * 1000 - 1500

        async def dropped() -> bool:
            return 0 < await ttl_held() < low

        async def renewed() -> bool:
            return await ttl_held() > low + 500

        await eventually_async(dropped, within=HELD_LEASE)
        await eventually_async(renewed, within=HELD_LEASE)
        assert not await other.claim("held")
        print(
            f"\n[chaos] dedup {switch}: calls={len(calls)} slowest={max(calls):.2f}s "
            f"promoted_after={promoted_at - switch_at:.2f}s"
        )
    finally:
        await window.close()
        await other.close()
    assert asyncio.all_tasks() - tasks_before == set()  # sentinel watchers and renewer ended
