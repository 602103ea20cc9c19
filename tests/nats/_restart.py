"""Restart a server under a connected transport and wait until the transport is back."""

from __future__ import annotations

import asyncio

from loom_ha.testing.nats_servers import NatsServer
from loom_ha.transport import Transport, TransportState


async def restart_and_reconnect(transport: Transport, server: NatsServer) -> None:
    """Restart `server` and return once `transport` went reconnecting and connected again."""
    seen: list[TransportState] = []
    back = asyncio.Event()

    def record(state: TransportState) -> None:
        seen.append(state)
        if state is TransportState.CONNECTED and TransportState.RECONNECTING in seen:
            back.set()

    remove = transport.add_state_listener(record)
    assert remove is not None, "every loom-ha transport announces its state"
    try:
        await asyncio.to_thread(server.restart)
        async with asyncio.timeout(15):
            await back.wait()
    finally:
        remove()
