"""A LoomApp process serving nodes over a loom-ha transport (used by the multi-process tests).

Usage: python node_server.py URL INSTANCE_NAME LOG_FILE
Prints READY once every node listens; on SIGTERM closes the transport and exits.
Every request it processes is appended to LOG_FILE as "<node> <request id>".
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from loom.api.main import LoomApp
from loom.node.base import Node
from loom.node.crew import CrewNode

from loom_ha.loom import loom_transport, start_nodes


class _Remote:
    """Stands for a node that may live in another process (CrewNode calls it by URI)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.source_uri = f"/node/{node_id}"


async def serve(url: str, instance: str, log_path: str) -> None:
    transport = loom_transport(url)
    app = LoomApp(transport=transport)
    # Line-buffered and opened once: records survive a SIGKILL of this process.
    log = open(log_path, "a", buffering=1)  # noqa: ASYNC230, SIM115

    def record(node: str, event: Any) -> None:
        log.write(f"{node} {event.id}\n")

    class Echo(Node):
        async def process(self, event: Any) -> Any:
            record("echo", event)
            return f"{instance}:{event.data['task']}"

    class Upper(Node):
        async def process(self, event: Any) -> Any:
            record("upper", event)
            return str(event.data["task"]).upper()

    class Shout(Node):
        async def process(self, event: Any) -> Any:
            record("shout", event)
            answer = await self.call("node/upper", {"task": event.data["task"]})
            return f"{answer}!"

    class Slow(Node):
        async def process(self, event: Any) -> Any:
            record("slow", event)
            await asyncio.sleep(float(event.data.get("seconds", 3)))
            return "late"

    nodes = [
        Echo("echo", app.dispatcher),
        Upper("upper", app.dispatcher),
        Shout("shout", app.dispatcher),
        Slow("slow", app.dispatcher),
        CrewNode("crew", app.dispatcher, agents=[_Remote("upper"), _Remote("shout")]),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await start_nodes(app, *nodes)
        print("READY", flush=True)
        await stop.wait()
    finally:
        await transport.close()
        log.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], sys.argv[3]))
