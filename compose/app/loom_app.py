"""Example Loom node for the compose files: an echo agent on the transport the environment names.

Environment: LOOM_TRANSPORT / REDIS_URL / NATS_SERVERS / LOOM_HA_OPTIONS (read by
`loom_ha.config.transport_from_env`), LOOM_NODE_ID (the node id, default ``loom-echo``),
and, to register every node in a registry and route requests through it, LOOM_HA_REGISTRY
(``consul://consul-1:8500``; CONSUL_HTTP_TOKEN for ACLs) and LOOM_HA_INSTANCE_ID. Replace
this file with your own app; keep the shape: build the transport, start the nodes, close
on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack
from typing import Any

from loom.api.main import LoomApp
from loom.node.base import Node

from loom_ha.loom import loom_transport, start_nodes

log = logging.getLogger("loom_app")


class Echo(Node):  # type: ignore[misc]
    """Answers every request with its task."""

    async def process(self, event: Any) -> Any:
        return (event.data or {}).get("task")


async def main() -> None:
    """Run one echo node until SIGTERM/SIGINT, registered in Consul when configured."""
    node_id = os.environ.get("LOOM_NODE_ID", "loom-echo")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        transport = await stack.enter_async_context(loom_transport())
        app = LoomApp(transport=transport)
        node = Echo(node_id, app.dispatcher)
        await start_nodes(app, node)
        log.warning("node %s is up on %s", node_id, os.environ.get("LOOM_TRANSPORT", "memory"))
        await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main())
