"""Glue for loom-agent 0.3.4: make LoomApp's fire-and-forget start-up deterministic.

Loom nodes subscribe to their request topic from a task started in `Node.__init__`
and nobody awaits it, so a request sent right away can reach no one. `start_nodes`
awaits the app's start and every node's subscription before returning.
"""

from __future__ import annotations

from typing import Any


async def start_nodes(app: Any, *nodes: Any) -> None:
    """Start `app` (a `LoomApp`) and wait until every node listens for requests.

    Idempotent: a node that already subscribed is left alone.
    """
    await app.start()
    for node in nodes:
        await node._subscribe_to_events()
