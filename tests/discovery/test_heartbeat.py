"""Heartbeats and watches cost per process, not per instance: requests counted on a real agent.

The counts come from an aiohttp trace config on the registry's own sessions: every HTTP
request (and every new connection) the client really sent to the Consul agent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import aiohttp
import pytest

from loom_ha.discovery.consul import RECONCILE_EVERY, ConsulRegistry
from loom_ha.errors import ConfigurationError
from loom_ha.testing.registry_conformance import eventually, next_snapshot
from loom_ha.testing.servers import ConsulAgent

from .conftest import consul_url, instance

pytestmark = pytest.mark.consul


class Sent:
    """Every request and new connection of the sessions it is installed on."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []  # (method, path, query)
        self.connections = 0
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_start.append(self._request)
        self.trace.on_connection_create_end.append(self._connection)

    async def _request(
        self, _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        self.requests.append((params.method, params.url.path, params.url.query_string))

    async def _connection(self, *_: object) -> None:
        self.connections += 1


async def test_heartbeat_round_is_one_request_whatever_the_instances(
    consul_agent: ConsulAgent, service: str
) -> None:
    """100 instances: each round is one TTL pass (and every tenth a listing), not 100 requests."""
    sent = Sent()
    count = 100
    async with ConsulRegistry(
        consul_url(consul_agent), ttl=0.9, max_connections=4, trace_configs=[sent.trace]
    ) as registry:
        # All at once: calls wait for one of the 4 slots, their deadline starts with it.
        await asyncio.gather(*(registry.register(instance(service, n)) for n in range(count)))
        assert len(await registry.instances(service)) == count
        # Bounded pool: 4 for calls, 2 kept for heartbeat rounds, whatever the concurrency.
        assert sent.connections <= 4 + 2
        before = registry.statistics()
        sent.requests.clear()

        async def rounds_done() -> bool:
            return registry.statistics().heartbeat_rounds >= before.heartbeat_rounds + 12

        # Bound: a round every 0.3 s; the rest is margin for a loaded machine.
        await eventually(rounds_done, within=20.0, what="12 heartbeat rounds")
        after = registry.statistics()  # read at once: a round updates it in one step
        kinds = Counter(
            "pass" if path.startswith("/v1/agent/check/pass/loom-ha-heartbeat:") else path
            for _, path, _ in sent.requests
        )
    rounds = after.heartbeat_rounds - before.heartbeat_rounds
    print(f"\n{count} instances, {rounds} rounds: requests sent {dict(kinds)}")
    # A round in flight has sent its request but is not counted yet: at most one more.
    assert rounds <= kinds.pop("pass") <= rounds + 1
    assert kinds.pop("/v1/agent/services", 0) <= rounds // RECONCILE_EVERY + 1
    assert kinds == {}  # nothing per instance
    assert after.heartbeats - before.heartbeats == count * rounds
    assert after.heartbeat_failures == 0


async def test_watches_of_a_service_share_one_blocking_query(
    consul_agent: ConsulAgent, service: str
) -> None:
    """Five watches of one service: one blocking query per change, not five."""
    sent = Sent()
    url = consul_url(consul_agent)
    async with (
        ConsulRegistry(url, ttl=3.0) as mine,
        ConsulRegistry(url, watch_wait=30.0, trace_configs=[sent.trace]) as watcher,
    ):
        watches = [watcher.watch(service) for _ in range(5)]
        for watch in watches:
            await next_snapshot(watch, lambda s: s.ids == [])
        for n in range(3):
            await mine.register(instance(service, n))
            for watch in watches:
                await next_snapshot(watch, lambda s, n=n: len(s.ids) == n + 1)
        queries = [r for r in sent.requests if r[1] == f"/v1/health/service/{service}"]
        assert watcher.statistics().watched_services == 1
        for watch in watches:
            await watch.aclose()
    print(f"\n5 watches, 3 changes: {len(queries)} queries of the service")
    # One answer at once, one per change, and the one blocked now (watch_wait is 30 s, so no
    # query ended by timing out). Five separate watches would have sent 5 times as many.
    assert len(queries) <= 1 + 3 + 1
    assert sum("index=" in query for _, _, query in queries) >= 3


async def test_watching_more_services_than_max_watches_is_refused(
    consul_agent: ConsulAgent, service: str
) -> None:
    """Each watched service holds a connection: one past `max_watches` is refused by name."""
    async with ConsulRegistry(consul_url(consul_agent), max_watches=2) as registry:
        first, second = registry.watch(f"{service}-a"), registry.watch(f"{service}-b")
        also_first = registry.watch(f"{service}-a")  # shares the first query: no new one
        with pytest.raises(ConfigurationError, match="max_watches=2"):
            registry.watch(f"{service}-c")
        await first.aclose()
        assert registry.statistics().watched_services == 2  # `also_first` still follows it
        await also_first.aclose()
        third = registry.watch(f"{service}-c")
        await next_snapshot(third, lambda s: s.ids == [])
        for watch in (second, third):
            await watch.aclose()
