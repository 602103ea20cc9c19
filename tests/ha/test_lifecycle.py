"""HATransport's lifecycle over real brokers: what every backend does alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from loom_ha.config import create_transport
from loom_ha.errors import TransportClosedError
from loom_ha.ha import HATransport
from loom_ha.nats import NatsCoreTransport
from loom_ha.redis import RedisPubSubTransport
from loom_ha.retry import RetryPolicy
from loom_ha.testing.collect import Collector
from loom_ha.testing.conformance import make_event
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import NatsServer, RedisServer, free_port
from loom_ha.transport import Transport, TransportState

BROKERS: dict[str, tuple[Callable[[int], object], Callable[[int], Transport]]] = {
    # A short per-attempt limit, so the test sees the inner connect give up at least once.
    "redis": (
        lambda port: RedisServer(port),
        lambda port: RedisPubSubTransport(f"redis://127.0.0.1:{port}", connect_timeout=0.5),
    ),
    "nats": (
        lambda port: NatsServer(port),
        lambda port: NatsCoreTransport([f"nats://127.0.0.1:{port}"], connect_timeout=0.5),
    ),
}


@pytest.mark.parametrize(
    "broker",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("nats", marks=pytest.mark.nats)],
)
async def test_connect_waits_for_a_broker_that_starts_later(
    broker: str, server_launcher: ServerLauncher
) -> None:
    """A service that starts before its broker (every compose start-up) keeps trying to
    connect and succeeds once the broker is up, on every backend (Redis used to give up
    with FailoverExhaustedError after its first connect_timeout)."""
    make_server, make_inner = BROKERS[broker]
    port = free_port()
    retried = asyncio.Event()

    async def backoff(seconds: float) -> None:
        retried.set()  # an inner connect attempt failed: the broker is not up yet
        await asyncio.sleep(seconds)

    ha = HATransport(
        lambda: make_inner(port), retry=RetryPolicy(wait_initial=0.05, wait_max=0.2, sleep=backoff)
    )
    connecting = asyncio.ensure_future(ha.connect())
    try:
        waiting = asyncio.ensure_future(retried.wait())
        # bound: one 0.5 s attempt plus its backoff
        await asyncio.wait([waiting, connecting], timeout=30, return_when="FIRST_COMPLETED")
        waiting.cancel()
        if connecting.done():
            connecting.result()  # connect() gave up: raises why
        assert retried.is_set() and ha.statistics().state is TransportState.CONNECTING
        await asyncio.to_thread(server_launcher.start, make_server(port))  # type: ignore[arg-type]
        async with asyncio.timeout(30):  # bound: a 0.5 s attempt, a 0.2 s backoff, a start
            await connecting
        assert ha.statistics().state is TransportState.CONNECTED
        got = Collector()
        await ha.subscribe("later/x", got)
        event = make_event()
        await ha.publish("later/x", event)
        assert [e.id for e in await got.wait_for(1)] == [event.id]
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await ha.close()


async def _broker_clients(broker: str, server: object) -> set[str]:
    """The ids of the client connections the broker itself lists (ours included or not).

    Ids, not a count: a client of some earlier test that reconnects to a reused port may come
    or go meanwhile; what matters is that no client *this* test opened is left.
    """
    if broker == "redis":
        assert isinstance(server, RedisServer)
        raw = aioredis.Redis.from_url(server.url)
        try:
            own = str(await raw.client_id())
            return {str(c["id"]) for c in await raw.client_list()} - {own}
        finally:
            await raw.aclose()
    assert isinstance(server, NatsServer)

    def connz() -> set[str]:
        with urllib.request.urlopen(f"{server.monitoring_url}/connz", timeout=5) as reply:
            return {str(c["cid"]) for c in json.load(reply).get("connections") or []}

    return await asyncio.to_thread(connz)


CLOSE_DURING_CONNECT = [
    pytest.param("memory", "memory://", id="memory"),
    pytest.param(
        "redis", "redis://127.0.0.1:{port}?mode=pubsub", marks=pytest.mark.redis, id="redis-pubsub"
    ),
    pytest.param("redis", "redis://127.0.0.1:{port}", marks=pytest.mark.redis, id="redis-streams"),
    pytest.param(
        "nats", "nats://127.0.0.1:{port}?mode=core", marks=pytest.mark.nats, id="nats-core"
    ),
    pytest.param("nats", "nats://127.0.0.1:{port}", marks=pytest.mark.nats, id="nats-jetstream"),
]


@pytest.mark.parametrize("when", ["at-once", "next-tick", "broker-saw-it"])
@pytest.mark.parametrize(("broker", "url"), CLOSE_DURING_CONNECT)
async def test_close_while_connecting_leaves_nothing_behind(
    broker: str, url: str, when: str, server_launcher: ServerLauncher
) -> None:
    """close() from another task while connect() is under way (Loom starts a connect in a
    task nobody awaits) leaves no task, no socket and no client on the broker; connect()
    then raises TransportClosedError, and the transport stays closed."""
    server: object = None
    if broker == "redis":
        server = await asyncio.to_thread(server_launcher.redis)
        url = url.format(port=server.port)
    elif broker == "nats":
        server = await asyncio.to_thread(server_launcher.nats, jetstream=True)
        url = url.format(port=server.port)
    baseline = await _broker_clients(broker, server) if server is not None else set()
    tasks_before = asyncio.all_tasks() - {asyncio.current_task()}
    transport = create_transport(url)
    connecting = asyncio.ensure_future(transport.connect())
    if when == "next-tick":
        await asyncio.sleep(0)
    elif when == "broker-saw-it" and server is not None:
        for _ in range(1000):  # until the broker counts our connection (or connect is done)
            if connecting.done() or await _broker_clients(broker, server) - baseline:
                break
            await asyncio.sleep(0.005)
    await transport.close()
    # Closed before it finished: TransportClosedError, unless connect() finished first.
    with contextlib.suppress(TransportClosedError):
        await connecting
    assert transport.statistics().state is TransportState.CLOSED
    with pytest.raises(TransportClosedError):
        await transport.connect()
    assert asyncio.all_tasks() - {asyncio.current_task()} == tasks_before
    if server is not None:
        # The broker notices a closed socket a moment later: eventually, within 10 s. New
        # clients only: one in the baseline may leave meanwhile (a client of another run on
        # this machine reconnecting to a reused port was seen in it, then gone).
        for _ in range(1000):
            if not await _broker_clients(broker, server) - baseline:
                break
            await asyncio.sleep(0.01)
        left = await _broker_clients(broker, server) - baseline
        assert not left, f"client(s) {left} stayed on the broker"
