"""HATransport's lifecycle over real brokers: what every backend does alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

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
