"""BalancedTransport hands the balancer one tuple per registry snapshot; changes show at once."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from loom_ha.balancing import RoundRobin
from loom_ha.nats import NatsCoreTransport
from loom_ha.routing import BalancedTransport
from loom_ha.testing.servers import NatsServer

from .test_balanced import Cluster

pytestmark = [pytest.mark.nats, pytest.mark.timeout(60)]


async def _sees(client: BalancedTransport, cluster: Cluster, count: int) -> None:
    """Wait until the client's watch lists `count` instances (woken by the change itself)."""
    assert client._directory is not None
    service = client.routes.service(cluster.node)
    # 10 s is margin for a busy machine, not an estimate: the watch wakes on the change.
    async with asyncio.timeout(10):
        while len(await client._directory.instances(service)) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_joining_instance_gets_the_next_round_and_a_leaving_one_none(
    nats_server: NatsServer,
) -> None:
    """Round robin over the snapshot: once the watch has seen an instance join, each round
    of calls includes it; once it has seen one leave, no call goes there."""
    cluster = Cluster(lambda: NatsCoreTransport([nats_server.url]))
    try:
        await cluster.serve("i0")
        await cluster.serve("i1")
        client = await cluster.client(RoundRobin())
        await _sees(client, cluster, 2)
        assert Counter([await cluster.call(client) for _ in range(4)]) == {"i0": 2, "i1": 2}
        await cluster.serve("i2")
        await _sees(client, cluster, 3)
        answers = Counter([await cluster.call(client) for _ in range(6)])
        assert answers == {"i0": 2, "i1": 2, "i2": 2}
        await cluster.instances["i1"].close()  # deregisters
        await _sees(client, cluster, 2)
        assert Counter([await cluster.call(client) for _ in range(6)]) == {"i0": 3, "i2": 3}
    finally:
        await cluster.close()
