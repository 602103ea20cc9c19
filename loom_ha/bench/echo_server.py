"""An echo service process for the balancing benchmark: plain CloudEvents, no Loom needed.

Usage: python -m loom_ha.bench.echo_server TRANSPORT_URL REGISTRY_URL INSTANCE_ID WORK_MS

Serves ``node.request/node/bench`` through a `BalancedTransport` (registered in the
registry), waits WORK_MS per request (an agent waiting on a model or a tool), answers on
``node.response/node/bench``. Prints READY when registered; exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from loom_ha.config import create_transport
from loom_ha.discovery import open_registry
from loom_ha.event import CloudEvent
from loom_ha.routing import BalancedTransport

REQUESTS = "node.request/node/bench"
REPLIES = "node.response/node/bench"


async def serve(transport_url: str, registry_url: str, instance_id: str, work_ms: float) -> None:
    """Serve until SIGTERM."""
    transport = BalancedTransport(
        create_transport(transport_url), open_registry(registry_url), instance_id=instance_id
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def echo(event: Any) -> None:
        if work_ms:
            await asyncio.sleep(work_ms / 1000)
        reply = CloudEvent.create(
            source="/node/bench",
            type="node.response",
            data={"request_id": event.id, "result": instance_id},
        )
        await transport.publish(REPLIES, reply)

    async with transport:
        await transport.subscribe(REQUESTS, echo)
        print("READY", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
