"""Churn: instances join and leave 10 times a second while requests are routed to them.

Issue 13, item 4. One client (`BalancedTransport` with ``hash:subject``, the consistent
hash inside the default ejector) sends requests keyed by 256 subjects, 8 at a time and at
most 1,000/s, over NATS core, to instances that come and go: every 0.1 s one registers or
one deregisters (a random walk between 6 and 14 instances, 10 at the start). Each instance
is its own transport and registry client, as a process would be. About half of the leaves
are drains (deregister, keep serving until the client's directory dropped it, then close),
the rest `BalancedTransport.close()` (deregister, then stop at once: requests already
addressed to it are lost at the broker and retried when the client sees it leave).

Checked from a record of every choice, delivery and departure (tests/routing/churn.py):
every request is answered; nothing is addressed to an instance after the client's
directory dropped it, so none reaches an instance deregistered more than one watch round
trip ago unless it was on the wire already (one round trip = from `deregister()` returning
to the directory no longer listing it, measured per departure by a watch on the client's
own registry, which shares the directory's query loop and wakes in the same loop step);
every choice equals a ring rebuilt from the instances offered, so a key moves only when
its owner left or a newcomer took its segment.

Consul (the production registry) churns for the full minute (600 events); Redis for 3 s
and memory for 2 s, which keeps the file near 70 s. Two short tests pin a fix found while
building this one: after a broker call the router chooses from the directory's list of
now, not the one it read before the call.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from typing_extensions import override

from loom_ha.balancing import Ejector, RoundRobin
from loom_ha.discovery import MemoryRegistry, MemoryStore, ServiceRegistry
from loom_ha.errors import ConnectionLostError
from loom_ha.nats import NatsCoreTransport
from loom_ha.routing import BalancedTransport
from loom_ha.routing.config import balancer_named
from loom_ha.testing.servers import ConsulAgent, NatsServer, RedisServer
from loom_ha.transport import Transport

from .churn import Recorder, RingInput, Timeline, ring_moves, staleness
from .test_balanced import Cluster

pytestmark = pytest.mark.nats

RATE = 10.0  # registrations + deregistrations per second
START, LOW, HIGH = 10, 6, 14  # instances at the start, and the random walk's bounds
WORKERS = 8  # requests in flight
REQUEST_RATE = 1000.0  # requests per second at most (unpaced they would take a whole core)
KEYS = [f"session-{k}" for k in range(256)]
CALL_TIMEOUT = 30.0  # Loom's request timeout: a call not answered by then is lost
# How long a departed instance may stay listed before we call it never dropped. A Consul
# blocking query returns on the change and Redis is polled every 0.25 s; a watch that
# missed a change would show it only at its next full answer (watch_wait, 10 s).
LISTED_BOUND = 20.0

REGISTRIES = [
    # 60 s of churn plus setup, the drains and the analysis: more than the 60 s the other
    # routing tests get; 150 s leaves room for a loaded machine.
    pytest.param(("consul", 60.0), marks=[pytest.mark.consul, pytest.mark.timeout(150)]),
    pytest.param(("redis", 3.0), marks=pytest.mark.redis),
    pytest.param(("memory", 2.0)),
]


class ChurnCluster(Cluster):
    """`Cluster` (tests/routing/test_balanced.py) with a registry of the test's choosing."""

    def __init__(
        self, make_inner: Callable[[], Transport], make_registry: Callable[[], ServiceRegistry]
    ) -> None:
        super().__init__(make_inner)
        self.make_registry = make_registry

    def registry(self) -> ServiceRegistry:  # type: ignore[override]
        return self.make_registry()


@pytest.fixture(params=REGISTRIES, ids=lambda p: f"{p[0]}-{p[1]:g}s")
def churn(request: pytest.FixtureRequest) -> tuple[str, float, Callable[[], ServiceRegistry]]:
    """(registry name, seconds of churn, a factory of registry clients)."""
    name, window = request.param
    if name == "consul":
        agent: ConsulAgent = request.getfixturevalue("consul_agent")
        from loom_ha.discovery.consul import ConsulRegistry

        return name, window, lambda: ConsulRegistry(f"consul://{agent.address}")
    if name == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        from loom_ha.discovery.redis import RedisRegistry

        return name, window, lambda: RedisRegistry(redis.url)
    store = MemoryStore()
    return name, window, lambda: MemoryRegistry(store)


@pytest.mark.chaos
async def test_requests_survive_churn_and_keys_follow_the_ring(
    nats_server: NatsServer, churn: tuple[str, float, Callable[[], ServiceRegistry]]
) -> None:
    """Instances join and leave 10 times a second while requests flow: every request is
    answered, none is addressed to an instance the client's directory has dropped, and
    every key goes to the owner a freshly built ring gives it."""
    registry_name, window, make_registry = churn
    rng, keys = random.Random(13), random.Random(14)  # the walk; the requests' keys
    timeline = Timeline()
    cluster = ChurnCluster(lambda: NatsCoreTransport([nats_server.url]), make_registry)
    ejector = balancer_named("hash:subject")
    assert isinstance(ejector, Ejector)
    ring = RingInput(ejector.inner)
    ejector.inner = ring
    joining = 0
    names = iter(f"c{n:04d}" for n in range(10_000))

    def receive(instance: str, event: Any) -> None:
        timeline.delivered(instance, str(event.id))

    async def join() -> None:
        nonlocal joining
        joining += 1
        try:
            await cluster.serve(next(names), receive)
            timeline.joins += 1
        finally:
            joining -= 1

    async def leave(name: str, mode: str) -> None:
        transport = cluster.instances.pop(name)
        try:
            assert transport.registry is not None
            (registration,) = transport.registry.registrations
            await registration.deregister()
            timeline.left(name, mode)
            if mode == "drain":
                await _until_unlisted(timeline, name)
        finally:
            await transport.close()

    async def run_churn() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.TaskGroup() as events:
            for n in range(round(window * RATE)):
                await asyncio.sleep(max(0.0, start + n / RATE - loop.time()))
                live = sorted(cluster.instances)
                population = len(live) + joining
                grow = population <= LOW or (population < HIGH and rng.random() < 0.5)
                if grow or not live:
                    events.create_task(join())
                else:
                    mode = rng.choice(("drain", "close"))
                    events.create_task(leave(rng.choice(live), mode))

    stop = asyncio.Event()
    slots = itertools.count()

    async def requests(client: BalancedTransport, began: float) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await asyncio.sleep(max(0.0, began + next(slots) / REQUEST_RATE - loop.time()))
            key = keys.choice(KEYS)
            timeline.requests += 1
            try:
                await cluster.call(client, timeout=CALL_TIMEOUT, subject=key)
            except TimeoutError:
                timeline.lost.append(key)
            except Exception as exc:  # counted and listed: the caller must never see one
                timeline.failed.append(repr(exc))
            else:
                timeline.answered += 1

    try:
        async with asyncio.TaskGroup() as starting:
            for _ in range(START):
                starting.create_task(join())
        client = await cluster.client(Recorder(ejector, ring, timeline))
        assert client.registry is not None
        watch = client.registry.watch(client.routes.service(cluster.node))

        async def observe() -> None:
            async for snapshot in watch:
                timeline.saw(snapshot.ids)

        observer = asyncio.create_task(observe())
        try:
            async with asyncio.timeout(LISTED_BOUND):  # the first answer; margin, not speed
                while len(timeline.listed) < START:
                    await timeline.changed()
            began = asyncio.get_running_loop().time()
            async with asyncio.TaskGroup() as running:
                for _ in range(WORKERS):
                    running.create_task(requests(client, began))
                await run_churn()
                stop.set()
            elapsed = asyncio.get_running_loop().time() - began
            try:  # a watch that missed a departure shows in `staleness()`
                async with asyncio.timeout(LISTED_BOUND):
                    while timeline.deregistered.keys() & timeline.listed:
                        await timeline.changed()
            except TimeoutError:
                pass
        finally:
            await watch.aclose()
            await observer
        stats = client.statistics().extra or {}
    finally:
        await cluster.close()

    late, late_figures = staleness(timeline)
    moves, move_figures = ring_moves(timeline)
    leaves = len(timeline.deregistered)
    drains = sum(1 for m in timeline.modes.values() if m == "drain")
    print(
        f"churn [{registry_name}, {window:g} s]: {timeline.requests} requests "
        f"({timeline.requests / elapsed:.0f}/s), {timeline.answered} answered, "
        f"{len(timeline.lost)} lost, {len(timeline.failed)} failed; "
        f"{timeline.joins - START + leaves} churn events ({timeline.joins - START} joins, "
        f"{leaves} leaves: {drains} drained, {leaves - drains} closed); {late_figures}; "
        f"{move_figures}; retries {stats.get('retries')}, abandoned {stats.get('abandoned')}, "
        f"ejections {ejector.statistics().ejections}"
    )
    assert not timeline.failed, timeline.failed[:5]
    assert not timeline.lost, f"{len(timeline.lost)} calls got no answer: {timeline.lost[:5]}"
    assert timeline.answered == timeline.requests
    assert not late, late[:5]
    assert not moves, moves[:5]
    assert leaves >= window * RATE / 4  # the walk did churn


async def _until_unlisted(timeline: Timeline, name: str) -> None:
    try:
        async with asyncio.timeout(LISTED_BOUND):
            await timeline.unlisted(name).wait()
    except TimeoutError:
        pass  # reported by `staleness()`: deregistered but still listed


# -- the router chooses from the directory's list as it is when it sends --------------------


class HookedNats(NatsCoreTransport):
    """NATS core that runs `hook(topic)` before each publish and subscribe while it is set
    (a churn event timed to fall inside one of the client's own broker calls)."""

    hook: Callable[[str], Awaitable[None]] | None = None

    @override
    async def publish(self, topic: str, event: Any) -> None:
        if self.hook is not None:
            await self.hook(topic)
        await super().publish(topic, event)

    @override
    async def subscribe(self, topic: str, handler: Any, *, group: str | None = None) -> None:
        if self.hook is not None:
            await self.hook(topic)
        await super().subscribe(topic, handler, group=group)


async def _dropped(client: BalancedTransport, cluster: Cluster, name: str) -> None:
    """Until the client's directory no longer lists `name`."""
    assert client.registry is not None
    async with client.registry.watch(client.routes.service(cluster.node)) as watch:
        async for snapshot in watch:
            if name not in snapshot.ids:
                break
    # The directory's watch got the same snapshot in this loop step; one more step and
    # it has applied it.
    await asyncio.sleep(0)


async def test_a_send_that_failed_is_retried_on_the_list_of_now(nats_server: NatsServer) -> None:
    """An instance leaves while a send to another one fails (an HA outbox timing out, say):
    the retry chooses from the directory's list after the failure, not the list before.

    On the list before, the retry went to the departed instance and, its departure already
    announced, waited out the whole attempt timeout (30 s here, past the call's 10 s)."""
    inner = HookedNats([nats_server.url])
    cluster = Cluster(lambda: NatsCoreTransport([nats_server.url]))
    try:
        await cluster.serve("a")
        await cluster.serve("b")
        cluster.make_inner = lambda: inner
        client = await cluster.client(RoundRobin(), attempt_timeout=30.0)

        async def fail_once(topic: str) -> None:
            if "@" not in topic:
                return
            inner.hook = None
            other = "b" if topic.endswith("@a") else "a"
            await cluster.instances.pop(other).close()  # deregisters, stops serving
            await _dropped(client, cluster, other)
            raise ConnectionLostError("the broker went away during the send")

        inner.hook = fail_once
        answered = await cluster.call(client, timeout=10.0)
        assert answered in ("a", "b") and answered in cluster.instances
        assert (client.statistics().extra or {})["retries"] == 1
    finally:
        await cluster.close()


async def test_the_first_request_chooses_after_subscribing_to_replies(
    nats_server: NatsServer,
) -> None:
    """The first request to a node subscribes to its replies before sending: an instance
    that left meanwhile is not chosen from the list read before subscribing.

    Before, it was, and (its departure announced while the request was not yet in flight)
    the request waited out the whole attempt timeout (30 s here, past the call's 10 s)."""
    inner = HookedNats([nats_server.url])
    cluster = Cluster(lambda: NatsCoreTransport([nats_server.url]))
    try:
        await cluster.serve("a")
        cluster.make_inner = lambda: inner
        client = await cluster.client(RoundRobin(), attempt_timeout=30.0)
        cluster.make_inner = lambda: NatsCoreTransport([nats_server.url])

        async def replace_a(topic: str) -> None:
            if not topic.startswith("node.response/"):
                return
            inner.hook = None
            await cluster.serve("b")
            await cluster.instances.pop("a").close()
            await _dropped(client, cluster, "a")

        inner.hook = replace_a
        assert await cluster.call(client, timeout=10.0) == "b"
    finally:
        await cluster.close()
