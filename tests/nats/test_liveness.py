"""Dead-peer detection of the NATS connection: a frozen server is cut off in bounded time,
idle or under load; pings never break the connection; the reconnect avoids the lost server;
the detection time is configurable by option and URL."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

from loom_ha.config import create_transport
from loom_ha.errors import ConfigurationError, ConnectionLostError
from loom_ha.event import CloudEvent
from loom_ha.nats import NatsCoreTransport
from loom_ha.nats._liveness import ServerChooser
from loom_ha.testing.collect import Collector
from loom_ha.testing.nats_servers import NatsServer
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.transport import TransportState

from ._relay import LaggingPongs

DETECTION_WAIT = 10.0
"""How long a test waits for a frozen server to be declared dead. The contract is 2 s
(`detection_time`); 10 s leaves room for a loaded machine while staying far below what
the old settings needed (10 s x 3 pings, and never under load)."""


def _event(data: object = None) -> CloudEvent:
    return CloudEvent.create(source="/test/liveness", type="liveness", data=data)


@pytest.mark.chaos
@pytest.mark.nats
@pytest.mark.parametrize("load", [False, True], ids=["idle", "under-load"])
async def test_a_frozen_server_is_cut_off_while_still_frozen(
    server_launcher: ServerLauncher, load: bool
) -> None:
    """SIGSTOP the only server, idle or while a publisher fills the socket: the transport
    leaves CONNECTED while the server is still frozen and `disconnect()` returns while it
    is frozen. (Under load nats-py's own reconnect used to hang on the unflushable socket
    until the server came back, and so did its close.)"""
    server: NatsServer = await asyncio.to_thread(server_launcher.nats, jetstream=False)
    transport = NatsCoreTransport([server.url])
    lost = asyncio.Event()
    transport.add_state_listener(
        lambda state: lost.set() if state is TransportState.RECONNECTING else None
    )
    payload = "x" * 16_384

    async def flood() -> None:
        # Ends with ConnectionLostError once the reconnect buffer is full: the only server
        # is frozen (HATransport would queue instead; the freeze chaos tests cover that).
        with contextlib.suppress(ConnectionLostError):
            while True:
                await transport.publish("liveness/flood", _event(payload))

    await transport.connect()
    flooding = asyncio.ensure_future(flood()) if load else None
    try:
        await asyncio.sleep(0.2)  # let the flood fill the socket buffers before the freeze
        await asyncio.to_thread(server.pause)
        try:
            async with asyncio.timeout(DETECTION_WAIT):
                await lost.wait()
            assert server.paused
            stats = transport.statistics()
            if flooding is not None:
                flooding.cancel()
                await asyncio.wait({flooding})
            async with asyncio.timeout(DETECTION_WAIT):
                await transport.disconnect()
            assert server.paused
        finally:
            await asyncio.to_thread(server.resume)
    finally:
        if flooding is not None:
            flooding.cancel()
            await asyncio.wait({flooding})
        await transport.disconnect()
    print(f"\n[liveness] load={load}: {stats.extra['last_error']}")
    assert stats.extra["dead_servers"] == 1


@pytest.mark.nats
async def test_a_ping_cut_short_leaves_the_connection_reading(nats_server: NatsServer) -> None:
    """A `ping()` abandoned before its PONG arrives (HATransport bounds its pings) does not
    break the connection: nats-py's flush() would leave a cancelled future whose late PONG
    ended its read loop, so nothing was received any more."""
    async with NatsCoreTransport([nats_server.url]) as transport:
        for _ in range(3):
            with contextlib.suppress(TimeoutError):  # a PONG this fast is fine too
                async with asyncio.timeout(0):
                    await transport.ping()
        await transport.ping()
        got = Collector()
        await transport.subscribe("liveness/after-ping", got)
        await transport.publish("liveness/after-ping", _event())
        await got.wait_for(1, within=5)


@pytest.mark.nats
async def test_a_server_busy_sending_messages_is_not_taken_for_dead(
    nats_server: NatsServer,
) -> None:
    """PONGs 4 s late (a server working through a backlog) while messages keep arriving:
    the connection stays; once the messages stop, the same silence is a dead server."""
    async with (
        LaggingPongs(nats_server.url, delay=4.0) as relay,
        NatsCoreTransport([relay.url]) as subscriber,
        NatsCoreTransport([nats_server.url]) as publisher,
    ):
        lost = asyncio.Event()
        subscriber.add_state_listener(
            lambda state: lost.set() if state is TransportState.RECONNECTING else None
        )
        got = Collector()
        await subscriber.subscribe("liveness/busy", got)
        for n in range(70):  # 3.5 s of messages: longer than the 2 s detection time
            await publisher.publish("liveness/busy", _event(n))
            await asyncio.sleep(0.05)
        await got.wait_for(70, within=10)
        assert relay.held >= 1  # a PING was answered late meanwhile (4 s > 1.5 s)
        assert subscriber.statistics().extra["dead_servers"] == 0
        async with asyncio.timeout(DETECTION_WAIT):  # no messages now: late PONGs only
            await lost.wait()
        assert subscriber.statistics().extra["dead_servers"] == 1


def _server(port: int) -> SimpleNamespace:
    return SimpleNamespace(uri=urlparse(f"nats://127.0.0.1:{port}"))


def test_the_reconnect_tries_the_server_it_just_lost_last() -> None:
    """After losing a server the others go first; a server is retried at most once per
    `reconnect_wait`, so a cluster that is down entirely is paced, not hammered."""
    pool = [_server(1), _server(2), _server(3)]
    choose = ServerChooser(wait=1.0)
    choose.lost(pool[0].uri)
    first, delay1 = choose(pool, {})
    second, delay2 = choose(pool, {})
    third, delay3 = choose(pool, {})
    assert {first.uri.port, second.uri.port} == {2, 3} and delay1 == delay2 == 0.0
    assert third.uri.port == 1 and 0.9 < delay3 <= 1.0
    again, delay4 = choose(pool, {})
    assert again.uri.port in (2, 3) and 0.9 < delay4 <= 1.0


def test_detection_time_follows_the_options_and_the_url() -> None:
    """`ping_interval` and `max_outstanding_pings` set the detection time, as keyword
    options or URL options; bad values are named."""
    assert NatsCoreTransport(["nats://h:1"]).options.detection_time == 2.0
    tuned = NatsCoreTransport(["nats://h:1"], ping_interval=1.0, max_outstanding_pings=4)
    assert tuned.options.detection_time == 5.0
    via_url = create_transport(
        "nats://h:1,h:2?mode=core&ping_interval=0.25&max_outstanding_pings=2"
    )
    assert via_url.inner.options.detection_time == 0.75  # type: ignore[attr-defined]
    for url, named in [
        ("nats://h:1?ping_interval=soon", "ping_interval"),
        ("nats://h:1?ping_interval=0", "ping_interval"),
        ("nats://h:1?max_outstanding_pings=0", "max_outstanding_pings"),
        ("nats://h:1?max_outstanding_pings=1.5", "max_outstanding_pings"),
        ("nats://h:1?pingz=1", "pingz"),
    ]:
        with pytest.raises(ConfigurationError, match=named):
            create_transport(url)
