"""NatsDedup on a real JetStream: claim once across instances, leases renew and lapse."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest

from loom_ha.errors import ConfigurationError
from loom_ha.nats import NatsDedup

pytestmark = pytest.mark.nats

# Leases a test expects to be still held, and renewals every LEASE / 3: a claim survives
# any stall (of this process or of the server) shorter than 2/3 * LEASE = 2 s.
LEASE = 3.0
# For owners whose lease a test waits out: asyncio.sleep never returns early, so a short
# one makes these tests quick without a bound that load could break.
SHORT_LEASE = 0.3

Windows = Callable[..., NatsDedup]


def _bucket() -> str:
    return f"dedup_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def windows(nats_server: Any) -> AsyncIterator[Windows]:
    """Makes windows on one fresh bucket (each with its own connection); closes them all."""
    made: list[NatsDedup] = []
    bucket = _bucket()

    def make(**options: Any) -> NatsDedup:
        options = {"ttl": 30.0, "lease": LEASE, "bucket": bucket, **options}
        window = NatsDedup(nats_server.url, **options)
        made.append(window)
        return window

    yield make
    for window in made:
        await window.close()


async def test_one_instance_claims_and_a_release_allows_a_new_claim(windows: Windows) -> None:
    """Two windows (two connections) on one bucket agree: only one claims an event."""
    first, second = windows(), windows()
    assert await first.claim("k")
    assert not await second.claim("k")
    assert not await first.claim("k")
    await first.release("k")
    assert await second.claim("k")  # over the delete marker
    assert not await first.claim("k")


async def test_any_key_works(windows: Windows) -> None:
    """Keys are hashed: separators, wildcards and non-ASCII are fine and stay distinct."""
    window = windows()
    keys = ["req:svc\x1fsrc/a b\x1f1", "*.>", "ünïcode", "", "x" * 5000]
    for key in keys:
        assert await window.claim(key)
    for key in keys:
        assert not await window.claim(key)


async def test_a_running_lease_is_renewed_and_a_completed_key_outlives_it(
    windows: Windows,
) -> None:
    """A running handler keeps its claim past the lease; `complete` keeps it for the ttl."""
    owner, finished, other = windows(), windows(), windows()
    assert await finished.claim("done")
    await finished.complete("done")
    await finished.close()  # nobody renews "done" from here on
    assert await owner.claim("running")
    # Longer than a lease (the deadline is wall-clock time, and asyncio.sleep never returns
    # early): without renewals "running" would have lapsed; the time passing is the test.
    await asyncio.sleep(LEASE + 0.5)
    assert not await other.claim("running")  # only the renewal kept it
    assert not await owner.claim("running")
    assert not await other.claim("done")  # completed: kept for the ttl, not the lease


async def test_the_claim_of_a_dead_owner_lapses(windows: Windows) -> None:
    """An owner closed mid-handler (no complete, no release) loses its claim after the lease."""
    owner, other = windows(), windows()
    assert await other.claim("warm-up")  # connected first: the next check is one round trip
    assert await owner.claim("orphan")
    await owner.close()
    assert not await other.claim("orphan")  # the lease still runs (for LEASE seconds)
    # The lease's deadline (claim + LEASE, wall clock) has passed after this sleep, which
    # never returns early; the time passing is the test.
    await asyncio.sleep(LEASE + 0.1)
    assert await other.claim("orphan")  # taken over
    assert await owner.claim("another")  # a closed window connects again when used


async def test_exactly_one_of_many_takes_a_lapsed_lease_over(windows: Windows) -> None:
    """Takeover is a compare-and-set on the revision: racing instances, one winner."""
    owner = windows(lease=SHORT_LEASE)
    racers = [windows() for _ in range(5)]
    for i, racer in enumerate(racers):
        assert await racer.claim(f"warm-up-{i}")  # connect first, so the race is on the KV
    assert await owner.claim("contended")
    await owner.close()
    await asyncio.sleep(SHORT_LEASE + 0.1)  # never returns early: the lease has lapsed
    won = await asyncio.gather(*(racer.claim("contended") for racer in racers))
    assert sorted(won) == [False] * 4 + [True]


async def test_a_taken_over_lease_is_not_released_by_its_old_owner(
    nats_server: Any, windows: Windows, caplog: pytest.LogCaptureFixture
) -> None:
    """The old owner's renewal notices the takeover, and its release leaves the new lease alone."""
    # A short lease only so that the renewal that notices the takeover comes soon.
    owner, other = windows(lease=SHORT_LEASE), windows()
    bucket = owner.bucket
    assert await owner.claim("k")
    client = await nats.connect(nats_server.url)
    try:
        kv = await client.jetstream().key_value(bucket)
        (name,) = await kv.keys()
        # What another instance writes when it takes a lapsed lease over.
        await kv.put(name, b"run:%.6f:someone-else" % (time.time() + 3600))
        with caplog.at_level(logging.WARNING, logger="loom_ha.nats.dedup"):
            await _eventually(lambda: _logged(caplog, "taken over"))
        await owner.release("k")
        assert (await kv.get(name)).value.startswith(b"run:")  # type: ignore[union-attr]
        assert not await other.claim("k")
    finally:
        await client.close()


async def test_close_leaves_no_task_behind(windows: Windows) -> None:
    """`close()` cancels the renewer and closes the connection's tasks; it is idempotent."""
    before = asyncio.all_tasks()
    first, second = windows(lease=SHORT_LEASE), windows(lease=SHORT_LEASE)
    assert await first.claim("a")
    assert await second.claim("b")
    # Not a synchronisation: renewers most likely ran meanwhile (each 0.1 s), and whether
    # they did or not, close() must leave no task behind.
    await asyncio.sleep(SHORT_LEASE)
    assert asyncio.all_tasks() - before
    await first.close()
    await second.close()
    await first.close()
    assert asyncio.all_tasks() - before == set()


async def test_a_never_used_window_closes_without_connecting(nats_server: Any) -> None:
    """The connection is lazy: a window that never claimed has nothing to close."""
    before = asyncio.all_tasks()
    window = NatsDedup(nats_server.url, bucket=_bucket())
    await window.close()
    assert asyncio.all_tasks() == before


async def test_a_bucket_keeps_one_ttl(windows: Windows) -> None:
    """Binding an existing bucket with another max_age fails, naming ttl and the bucket."""
    assert await windows(ttl=30.0).claim("k")
    other = windows(ttl=60.0)
    with pytest.raises(ConfigurationError, match="ttl"):
        await other.claim("k")
    assert not await windows(ttl=30.0).claim("k")  # same ttl: binds


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": 1, "lease": 5}, "lease"),
        ({"lease": 0}, "lease"),
        ({"ttl": "600"}, "ttl"),
        ({"replicas": 0}, "replicas"),
        ({"replicas": 6}, "replicas"),
        ({"bucket": "a.b"}, "bucket"),
        ({"bucket": ""}, "bucket"),
        ({"bogus_option": 1}, "bogus_option"),
        ({"connect_timeout": 0}, "connect_timeout"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], named: str) -> None:
    """Each bad option raises ConfigurationError naming it, before any connection."""
    with pytest.raises(ConfigurationError, match=named):
        NatsDedup("nats://127.0.0.1:1", **options)


def test_bad_servers_fail_at_construction() -> None:
    """Server URLs are validated like the transports' ones."""
    with pytest.raises(ConfigurationError, match="servers"):
        NatsDedup([])
    with pytest.raises(ConfigurationError, match="scheme"):
        NatsDedup("redis://127.0.0.1:6379")


async def test_replicas_above_one_on_a_single_server_is_a_configuration_error(
    nats_server: Any,
) -> None:
    """R3 needs a cluster: the server's refusal surfaces as ConfigurationError."""
    window = NatsDedup(nats_server.url, bucket=_bucket(), replicas=3)
    try:
        with pytest.raises(ConfigurationError, match="replicas=3"):
            await window.claim("k")
    finally:
        await window.close()


async def test_r3_bucket_on_a_cluster_is_shared_through_different_nodes(nats_cluster: Any) -> None:
    """With replicas=3, windows connected to different nodes share one replicated window."""
    bucket = _bucket()
    first, second = (
        NatsDedup(url, ttl=30.0, lease=LEASE, bucket=bucket, replicas=3)
        for url in nats_cluster.servers[:2]
    )
    client = await nats.connect(nats_cluster.servers[2])
    try:
        assert await first.claim("k")
        assert not await second.claim("k")
        await asyncio.sleep(LEASE + 0.5)  # longer than a lease: the time passing is the test
        assert not await second.claim("k")  # renewed through the cluster
        await first.release("k")
        assert await second.claim("k")
        info = await client.jetstream().stream_info(f"KV_{bucket}")
        assert info.config.num_replicas == 3
    finally:
        await client.close()
        await first.close()
        await second.close()


async def test_a_release_through_one_node_is_seen_at_once_through_another(
    nats_cluster: Any,
) -> None:
    """Claims read the stream leader: a replica that has not applied a release yet must not
    make the redelivery it was released for look held (NATS lets any replica answer a
    direct get, without read-your-writes)."""
    bucket = _bucket()
    first, second = (
        NatsDedup(url, ttl=30.0, lease=LEASE, bucket=bucket, replicas=3)
        for url in nats_cluster.servers[1:]
    )

    async def handed_over(key: str) -> bool:
        assert await first.claim(key)
        await first.release(key)
        return await second.claim(key)

    try:
        granted = await asyncio.gather(*(handed_over(f"k{i}") for i in range(200)))
        assert granted.count(False) == 0
    finally:
        await first.close()
        await second.close()


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def _eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
