"""Connection behaviour of the NATS backends against real servers: auth, TLS, state."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    NotConnectedError,
    TransientError,
)
from loom_ha.event import CloudEvent
from loom_ha.nats import JetStreamTransport, NatsCoreTransport
from loom_ha.testing.collect import Collector
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import NatsServer, free_port
from loom_ha.transport import TransportState

pytestmark = pytest.mark.nats


def _event() -> CloudEvent:
    return CloudEvent.create(source="/test/conn", type="conn.test", data={"x": 1})


async def _round_trip(transport: NatsCoreTransport) -> None:
    got = Collector()
    topic = f"conn.{uuid.uuid4().hex[:8]}/x"
    await transport.subscribe(topic, got)
    await transport.publish(topic, _event())
    await got.wait_for(1)


async def test_user_password_and_token_auth(server_launcher: ServerLauncher) -> None:
    """Credentials given as options (or in the URL) authenticate; wrong ones fail clearly."""
    users = await asyncio.to_thread(
        server_launcher.nats, jetstream=False, user="loom", password="s3cret"
    )
    tokens = await asyncio.to_thread(server_launcher.nats, jetstream=False, token="tok3n")
    plain_users = f"nats://127.0.0.1:{users.port}"
    plain_tokens = f"nats://127.0.0.1:{tokens.port}"
    for transport in (
        NatsCoreTransport([plain_users], user="loom", password="s3cret"),
        NatsCoreTransport([users.url]),
        NatsCoreTransport([plain_tokens], token="tok3n"),
    ):
        async with transport:
            await _round_trip(transport)
    # One clear, non-retryable error naming the cause, long before connect_timeout (30 s).
    for wrong in (
        NatsCoreTransport([plain_users], user="loom", password="nope", connect_timeout=30.0),
        NatsCoreTransport([plain_tokens], token="wrong", connect_timeout=30.0),
    ):
        with pytest.raises(ConfigurationError, match="refused the credentials") as info:
            await wrong.connect()
        assert not isinstance(info.value, TransientError)
        await wrong.disconnect()


async def test_tls_with_a_ca_file_and_a_context(server_launcher: ServerLauncher) -> None:
    """A TLS server is reached with its CA given as a file or as an SSLContext."""
    server = await asyncio.to_thread(server_launcher.nats, jetstream=True, tls=True)
    assert server.ca_file is not None
    async with NatsCoreTransport([server.url], tls_ca_file=str(server.ca_file)) as core:
        await _round_trip(core)
    context = server.ssl_context()
    assert context is not None
    async with JetStreamTransport([server.url], tls=context) as js:
        got = Collector()
        await js.subscribe("tls/x", got)
        await js.publish("tls/x", _event())
        await got.wait_for(1)


async def test_unreachable_servers_fail_connect_within_the_timeout() -> None:
    """connect() to nothing raises ConnectionLostError after connect_timeout, leaving no socket."""
    transport = NatsCoreTransport([f"nats://127.0.0.1:{free_port()}"], connect_timeout=1.0)
    with pytest.raises(ConnectionLostError):
        await transport.connect()
    assert transport.statistics().state is TransportState.DISCONNECTED
    with pytest.raises(NotConnectedError):
        await transport.publish("x", _event())


async def test_state_changes_are_observable(server_launcher: ServerLauncher) -> None:
    """Listeners see connecting, connected, reconnecting and connected again after a restart."""
    server: NatsServer = await asyncio.to_thread(server_launcher.nats, jetstream=False)
    seen: list[TransportState] = []
    back = asyncio.Event()

    def record(state: TransportState) -> None:
        seen.append(state)
        if state is TransportState.CONNECTED and TransportState.RECONNECTING in seen:
            back.set()

    transport = NatsCoreTransport([server.url], reconnect_wait=0.1)
    transport.add_state_listener(record)
    async with transport:
        await asyncio.to_thread(server.restart)
        async with asyncio.timeout(15):
            await back.wait()
        await _round_trip(transport)
        stats = transport.statistics()
    assert seen[:2] == [TransportState.CONNECTING, TransportState.CONNECTED]
    assert TransportState.RECONNECTING in seen
    assert seen[-1] is TransportState.DISCONNECTED
    assert stats.reconnects == 1 and stats.endpoint == f"nats://127.0.0.1:{server.port}"
