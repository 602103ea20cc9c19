"""loom-agent 0.3.4's own LoomApp runs on loom-ha's in-memory transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from loom.api.main import LoomApp
from loom.node.base import Node
from loom.protocol.cloudevents import CloudEvent as LoomCloudEvent

from loom_ha.loom import start_nodes
from loom_ha.memory import InMemoryTransport


class Echo(Node):
    """Answers with the task it was given."""

    async def process(self, event: LoomCloudEvent) -> Any:
        return f"echo: {event.data['task']}"


class Shout(Node):
    """Calls the echo node (a nested node-to-node call) and shouts its answer."""

    async def process(self, event: LoomCloudEvent) -> Any:
        answer = await self.call("node/echo", {"task": event.data["task"]})
        return str(answer).upper()


@pytest.fixture
async def app() -> Any:
    """A LoomApp on a fresh in-memory transport, closed after the test."""
    transport = InMemoryTransport()
    app = LoomApp(transport=transport)
    yield app
    await transport.close()


async def test_echo_round_trip(app: Any) -> None:
    """app.run reaches the echo node and returns its result."""
    echo = Echo("echo", app.dispatcher)
    await start_nodes(app, echo)
    assert await app.run("Hello", target="node/echo") == "echo: Hello"


async def test_nested_node_to_node_call(app: Any) -> None:
    """A node that calls another node inside its handler gets the answer back."""
    echo, shout = Echo("echo", app.dispatcher), Shout("shout", app.dispatcher)
    await start_nodes(app, echo, shout)
    assert await app.run("hi", target="node/shout") == "ECHO: HI"
    # Node.call unsubscribed its response handler; LoomApp.run never unsubscribes
    # its own: echo, shout, the state store and app.run's handler remain.
    assert app.transport.statistics().handlers == 4


async def test_concurrent_runs_each_get_their_own_answer(app: Any) -> None:
    """Fifty concurrent app.run calls are answered, each with its own result."""
    echo = Echo("echo", app.dispatcher)
    await start_nodes(app, echo)
    results = await asyncio.gather(*(app.run(str(i), target="node/echo") for i in range(50)))
    assert results == [f"echo: {i}" for i in range(50)]
