"""BalancedTransport on a real broker: requests reach one chosen instance, failures move on.

Each "instance" is its own transport object with its own connection to the broker and its
own registry client, as separate processes would have (tests/loom/ runs real processes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from loom_ha.balancing import (
    Balancer,
    ConsistentHash,
    LeastOutstanding,
    PowerOfTwoEWMA,
    RoundRobin,
)
from loom_ha.discovery import MemoryRegistry, MemoryStore
from loom_ha.event import CloudEvent
from loom_ha.ha.dedup import DedupWindow
from loom_ha.nats import NatsCoreTransport
from loom_ha.redis import RedisDedup, RedisPubSubTransport, RedisStreamsTransport
from loom_ha.retry import RetryPolicy
from loom_ha.routing import BalancedTransport
from loom_ha.testing.servers import NatsServer, RedisServer
from loom_ha.transport import Transport

pytestmark = pytest.mark.timeout(60)

Behaviour = Callable[[str, Any], Any]  # (instance, request) -> awaitable or None


class Cluster:
    """N serving instances and one client of node `node`, on one broker and one registry."""

    def __init__(self, make_inner: Callable[[], Transport], *, shared: bool = True) -> None:
        self.make_inner = make_inner
        self.node = f"node/n{uuid.uuid4().hex[:8]}"
        self.topic = f"node.request/{self.node}"
        self.store = MemoryStore()
        self.shared = shared
        self.handled: Counter[str] = Counter()  # instance -> requests handled
        self.handled_ids: Counter[str] = Counter()  # request id -> times handled
        self.instances: dict[str, BalancedTransport] = {}
        self.clients: list[BalancedTransport] = []
        self._replies: dict[str, asyncio.Future[str]] = {}

    def registry(self) -> MemoryRegistry | None:
        return MemoryRegistry(self.store, ttl=3.0) if self.shared else None

    async def serve(
        self, name: str, behaviour: Behaviour | None = None, dedup: DedupWindow | bool = True
    ) -> BalancedTransport:
        transport = BalancedTransport(
            self.make_inner(), self.registry(), instance_id=name, dedup=dedup
        )
        await transport.connect()

        async def handle(event: Any) -> None:
            self.handled[name] += 1
            self.handled_ids[event.id] += 1
            if behaviour is not None:
                result = behaviour(name, event)
                if asyncio.iscoroutine(result):
                    await result
            reply = CloudEvent.create(
                source=f"/{self.node}",
                type="node.response",
                data={"request_id": event.id, "result": name},
            )
            await transport.publish(f"node.response/{self.node}", reply)

        await transport.subscribe(self.topic, handle)
        self.instances[name] = transport
        return transport

    async def client(self, balancer: Balancer | None = None, **options: Any) -> BalancedTransport:
        transport = BalancedTransport(
            self.make_inner(),
            self.registry(),
            instance_id=f"client-{len(self.clients)}",
            balancer=balancer,
            **options,
        )
        await transport.connect()
        await transport.subscribe(f"node.response/{self.node}", self._on_reply)
        self.clients.append(transport)
        return transport

    async def _on_reply(self, event: Any) -> None:
        future = self._replies.get(event.data["request_id"])
        if future is not None and not future.done():
            future.set_result(event.data["result"])

    async def call(
        self, client: Transport, timeout: float = 10.0, subject: str | None = None
    ) -> str:
        """One request; the name of the instance that answered."""
        event = CloudEvent.create(
            source="/test", type="node.request", data={"task": "x"}, subject=subject
        )
        future = self._replies[event.id] = asyncio.get_running_loop().create_future()
        try:
            await client.publish(self.topic, event)
            return await asyncio.wait_for(future, timeout)
        finally:
            del self._replies[event.id]

    async def close(self) -> None:
        for transport in [*self.clients, *self.instances.values()]:
            await transport.close()


REDIS_PUBSUB = pytest.param("redis-pubsub", marks=pytest.mark.redis)
REDIS_STREAMS = pytest.param("redis-streams", marks=pytest.mark.redis)
NATS_CORE = pytest.param("nats-core", marks=pytest.mark.nats)


@pytest.fixture(params=[REDIS_PUBSUB, NATS_CORE])
def make_inner(
    request: pytest.FixtureRequest,
) -> Callable[[], Transport]:
    if request.param.startswith("redis"):
        redis: RedisServer = request.getfixturevalue("redis_server")
        if request.param == "redis-streams":
            return lambda: RedisStreamsTransport(redis.url)
        return lambda: RedisPubSubTransport(redis.url)
    nats: NatsServer = request.getfixturevalue("nats_server")
    return lambda: NatsCoreTransport([nats.url])


@pytest.fixture
async def cluster(make_inner: Callable[[], Transport]) -> AsyncIterator[Cluster]:
    group = Cluster(make_inner)
    try:
        yield group
    finally:
        await group.close()


async def test_each_request_reaches_the_instance_the_balancer_chose(cluster: Cluster) -> None:
    """Round robin over 4 registered instances is exact, and each request is handled once."""
    for n in range(4):
        await cluster.serve(f"i{n}")
    client = await cluster.client(RoundRobin())
    answers = Counter([await cluster.call(client) for _ in range(400)])
    assert answers == {f"i{n}": 100 for n in range(4)}
    assert cluster.handled == answers
    assert set(cluster.handled_ids.values()) == {1}
    stats = client.statistics().extra or {}
    assert stats["routed"] == 400 and stats["replies"] == 400 and stats["retries"] == 0


# Redis Pub/Sub has no competing consumers (with a registry, inboxes give it some).
@pytest.mark.parametrize("make_inner", [REDIS_STREAMS, NATS_CORE], indirect=True)
async def test_without_a_registry_the_broker_group_picks_one_instance(
    make_inner: Callable[[], Transport],
) -> None:
    """No registry: requests go to the node's broker group, each to exactly one member."""
    cluster = Cluster(make_inner, shared=False)
    try:
        for n in range(3):
            await cluster.serve(f"i{n}")
        client = await cluster.client()
        await asyncio.gather(*(cluster.call(client) for _ in range(150)))
        assert sum(cluster.handled.values()) == 150
        assert set(cluster.handled_ids.values()) == {1}
        assert len(cluster.handled) >= 2  # the broker spread them
    finally:
        await cluster.close()


async def test_a_request_that_gets_no_reply_is_retried_on_another_instance(
    cluster: Cluster,
) -> None:
    """An instance that swallows requests costs one attempt each; another instance answers."""

    async def hang(name: str, event: Any) -> None:
        await asyncio.sleep(3600)

    await cluster.serve("dead", hang)
    for n in range(2):
        await cluster.serve(f"ok{n}")
    # The attempt timeout must exceed a live instance's reply (one broker round trip, ms)
    # by more than a scheduling stall, or a slow "ok" reply is retried too (and with three
    # such timeouts in a row a request is abandoned). Each timed-out attempt costs it once,
    # concurrently for all 30 calls: 2 s keeps the test short (it was 0.3 s).
    client = await cluster.client(RoundRobin(), attempt_timeout=2.0)
    answers = Counter(await asyncio.gather(*(cluster.call(client) for _ in range(30))))
    assert "dead" not in answers and sum(answers.values()) == 30
    stats = client.statistics().extra or {}
    assert stats["attempt_timeouts"] >= 1
    assert stats["retries"] == stats["attempt_timeouts"]
    assert stats["abandoned"] == 0


async def test_an_instance_leaving_the_registry_is_retried_at_once(cluster: Cluster) -> None:
    """A deregistered instance's requests in flight move on without waiting for the timeout."""
    leaving = asyncio.Event()

    async def stall(name: str, event: Any) -> None:
        leaving.set()
        await asyncio.sleep(3600)

    await cluster.serve("leaving", stall)
    client = await cluster.client(RoundRobin(), attempt_timeout=30)
    call = asyncio.create_task(cluster.call(client, timeout=20))
    await leaving.wait()
    await cluster.serve("stays")
    registration = cluster.instances["leaving"]._registrations[cluster.topic]
    await registration.deregister()
    # Causality, not speed: the call gives up after 20 s, before the 30 s attempt timeout
    # could retry it, so an answer from "stays" can only come from the departure.
    assert await call == "stays"


async def test_budget_ends_a_request_nobody_answers(cluster: Cluster) -> None:
    """When every attempt fails the request is abandoned (counted), not retried forever."""

    async def hang(name: str, event: Any) -> None:
        await asyncio.sleep(3600)

    await cluster.serve("a", hang)
    await cluster.serve("b", hang)
    client = await cluster.client(attempt_timeout=0.2, budget=RetryPolicy(attempts=2))
    with pytest.raises(TimeoutError):  # nobody answers: this only says no reply came
        await cluster.call(client, timeout=1.5)

    def stats() -> dict[str, Any]:
        return client.statistics().extra or {}

    # The request ends once its 2 attempts of 0.2 s have timed out; wait for that rather
    # than trust the 1.5 s above to cover it (10 s is margin for a loaded machine). One
    # retried forever never leaves in_flight.
    async with asyncio.timeout(10):
        while stats()["in_flight"]:  # noqa: ASYNC110 - statistics() has no change signal
            await asyncio.sleep(0.02)
    assert stats()["abandoned"] == 1 and stats()["retries"] == 1


@pytest.mark.parametrize("make_inner", [REDIS_PUBSUB], indirect=True)
async def test_a_shared_dedup_window_keeps_a_slow_instance_from_being_doubled(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    """A retry reaching a second instance while the first still works is dropped there."""
    prefix = f"test:{uuid.uuid4().hex}:"
    fast_dropped = asyncio.Event()

    async def slow(name: str, event: Any) -> None:
        # Still working, by construction rather than by a duration: it finishes only once
        # the retry reached "fast" and was dropped there.
        async with asyncio.timeout(20):
            await fast_dropped.wait()

    # The default lease (10 s, renewed every 3.3 s): the claim must outlive that wait, and
    # no lease lapse is under test here (tests/ha/test_dedup.py tests that).
    await cluster.serve("slow", slow, dedup=RedisDedup(redis_server.url, prefix=prefix))
    await cluster.serve("fast", dedup=RedisDedup(redis_server.url, prefix=prefix))
    fast = cluster.instances["fast"]
    # "fast" must answer the first request within one attempt, or its retry lands on
    # "slow" and shifts the round robin: 2 s is a broker round trip plus any stall.
    client = await cluster.client(RoundRobin(), attempt_timeout=2.0)
    # Round robin sends the first request to "fast" and the second to "slow".
    assert await cluster.call(client) == "fast"
    second = asyncio.create_task(cluster.call(client, timeout=30))
    try:
        async with asyncio.timeout(20):  # one attempt timeout, then the retry's trip
            while fast.statistics().duplicates_dropped == 0:  # noqa: ASYNC110 - no signal
                await asyncio.sleep(0.02)
        fast_dropped.set()
        assert await second == "slow"
    finally:
        second.cancel()
    assert cluster.handled_ids.most_common(1)[0][1] == 1
    assert fast.statistics().duplicates_dropped == 1


# -- strategies fed by real calls (NATS core: the fastest round trip here) -----------------

nats_only = pytest.mark.parametrize("make_inner", [NATS_CORE], indirect=True)


async def _load(cluster: Cluster, client: Transport, calls: int, concurrency: int) -> Counter[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with gate:
            return await cluster.call(client)

    return Counter(await asyncio.gather(*(one() for _ in range(calls))))


@nats_only
async def test_round_robin_is_exact_over_ten_thousand_requests(cluster: Cluster) -> None:
    """10,000 requests, 4 instances, 64 in flight: 2,500 each, each handled once."""
    for n in range(4):
        await cluster.serve(f"i{n}")
    client = await cluster.client(RoundRobin())
    answers = await _load(cluster, client, 10_000, 64)
    assert answers == {f"i{n}": 2_500 for n in range(4)}
    assert len(cluster.handled_ids) == 10_000 and set(cluster.handled_ids.values()) == {1}


@nats_only
@pytest.mark.parametrize("strategy", [LeastOutstanding, PowerOfTwoEWMA])
async def test_learning_strategies_send_less_to_a_slow_instance(
    cluster: Cluster, strategy: Callable[[], Balancer]
) -> None:
    """One of 4 instances takes 200 ms per request, the others 1 ms: it gets far less.

    The strategies see whole round trips, not handler time: on a loaded 2-core machine a
    round trip through the broker takes 10-20 ms, which made a 20 ms handler look only ~2x
    slower and the slow instance's share depend on the machine's load (seen: 218 of 2,000).
    200 ms keeps it ten times slower than any round trip seen here, loaded or not.
    """

    async def slow(name: str, event: Any) -> None:
        await asyncio.sleep(0.2)

    async def quick(name: str, event: Any) -> None:
        await asyncio.sleep(0.001)

    await cluster.serve("slow", slow)
    for n in range(3):
        await cluster.serve(f"fast{n}", quick)
    client = await cluster.client(strategy())
    answers = await _load(cluster, client, 2_000, 16)
    print(f"{strategy.__name__}: {dict(answers)}")
    assert sum(answers.values()) == 2_000
    # An even spread would give it 500; a 20x slower instance must get well under that.
    assert answers["slow"] < 2_000 / 4 / 3


@nats_only
async def test_consistent_hash_keeps_keys_and_moves_few_when_one_leaves(cluster: Cluster) -> None:
    """Same subject, same instance; when 1 of 4 leaves only about 1/4 of the keys move."""
    for n in range(4):
        await cluster.serve(f"i{n}")
    client = await cluster.client(ConsistentHash("subject"))
    keys = [f"session-{k}" for k in range(400)]

    async def owners() -> dict[str, str]:
        found: dict[str, str] = {}
        for key in keys:
            for _ in range(2):
                owner = await cluster.call(client, subject=key)
                assert found.setdefault(key, owner) == owner, f"{key} moved without a change"
        return found

    before = await owners()
    await cluster.instances["i3"].close()  # deregisters; the client's watch sees it leave
    service = client.routes.service(cluster.node)
    # The client's watch is woken by the deregistration: 10 s is margin, not an estimate.
    async with asyncio.timeout(10):
        while len(await client._directory.instances(service)) != 3:  # noqa: ASYNC110 - its view
            await asyncio.sleep(0.05)
    after = await owners()
    moved = sum(1 for key in keys if before[key] != after[key])
    print(f"consistent hash: {moved}/{len(keys)} keys moved when 1 of 4 instances left")
    assert all(after[key] == before[key] for key in keys if before[key] != "i3")
    assert moved == sum(1 for key in keys if before[key] == "i3")
    assert 0.15 < moved / len(keys) < 0.35


@pytest.mark.redis
async def test_an_instance_registers_once_the_registry_comes_up(nats_server: NatsServer) -> None:
    """Registry down at subscribe: the node serves through its group and registers later."""
    from loom_ha.discovery import RedisRegistry
    from loom_ha.testing.redis_servers import RedisServer

    registry_server = RedisServer()  # port chosen, not started yet
    # While the registry is down its connection is refused at once, whatever the timeout;
    # once it is up, the timeout bounds each call, and 5 s (the default; it was 0.5 s)
    # leaves room for a loaded machine.
    transport = BalancedTransport(
        NatsCoreTransport([nats_server.url]),
        RedisRegistry(registry_server.url, timeout=5.0),
        instance_id="early",
    )
    try:
        await transport.connect()
        await transport.subscribe("node.request/node/early", lambda event: None)
        assert (transport.statistics().extra or {})["registered"] == []
        with registry_server:
            async with asyncio.timeout(20):
                while not (transport.statistics().extra or {})["registered"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            assert transport.registry is not None
            found = await transport.registry.instances("early")
            assert [i.instance_id for i in found] == ["early"]
            await transport.close()
    finally:
        await transport.close()


@pytest.mark.redis
@pytest.mark.chaos
async def test_an_instance_that_lost_its_broker_leaves_the_passing_set() -> None:
    """HATransport reconnecting: the registration goes critical; reconnected: passing again."""
    from loom_ha.discovery import Health
    from loom_ha.ha import HATransport
    from loom_ha.testing.redis_servers import RedisServer

    store = MemoryStore()
    observer = MemoryRegistry(store)
    with RedisServer() as broker:
        transport = BalancedTransport(
            HATransport(RedisPubSubTransport(broker.url)),
            MemoryRegistry(store),
            instance_id="cut-off",
        )

        async def health() -> Health:
            (instance,) = await observer.instances("cut", passing_only=False)
            return instance.health

        async def until(expected: Health) -> None:
            async with asyncio.timeout(20):
                while await health() is not expected:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

        try:
            await transport.connect()
            await transport.subscribe("node.request/node/cut", lambda event: None)
            assert await health() is Health.PASSING
            broker.kill()
            await until(Health.CRITICAL)
            broker.restart()
            await until(Health.PASSING)
        finally:
            await transport.close()
            await observer.close()
