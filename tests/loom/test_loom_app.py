"""HALoomApp.run: no reply handler outlives its calls, and a node's error reaches the caller.

Every test runs over memory and over each real broker mode. Nodes live in the test's
process on the client's own transport, so a test can block a node on an `asyncio.Event`
and read the transport's `statistics()` while a call is in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from loom.kernel.interceptors.timeout import TimeoutInterceptor
from loom.node.base import Node

from loom_ha.errors import NodeError
from loom_ha.loom import HALoomApp, loom_transport, start_nodes

MEMORY_RUNS = 10_000
# Sequential calls over a real broker are a few round trips each (subscribe, request,
# reply, unsubscribe; JetStream, the slowest, makes a consumer per subscription: ~7 ms a
# call on an idle 2-core machine). 1,000 keeps each test under ~20 s on a loaded one; the
# counts are checked after every call, so a per-call leak shows at the first.
BROKER_RUNS = 1_000


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis-streams", marks=pytest.mark.redis),
        pytest.param("redis-pubsub", marks=pytest.mark.redis),
        pytest.param("nats-core", marks=pytest.mark.nats),
        pytest.param("nats-jetstream", marks=pytest.mark.nats),
    ]
)
def url(request: pytest.FixtureRequest) -> str:
    """A transport URL: the embedded default, or a real broker in each mode LoomApp runs on."""
    if request.param == "memory":
        return "memory://"
    kind, mode = request.param.split("-")
    server = request.getfixturevalue("redis_server" if kind == "redis" else "nats_server")
    return f"{server.url}?mode={mode}"


class Echo(Node):
    """Answers with the task it was given."""

    async def process(self, event: Any) -> Any:
        return f"echo: {event.data['task']}"


class Picky(Node):
    """Fails on tasks that start with "bad", answers the others."""

    async def process(self, event: Any) -> Any:
        task = str(event.data["task"])
        if task.startswith("bad"):
            raise ValueError(f"cannot do {task}")
        return f"done: {task}"


class Gate(Node):
    """Holds every request until `release` is set; `arrived` is set when one is being held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrived, self.release = asyncio.Event(), asyncio.Event()

    async def process(self, event: Any) -> Any:
        self.arrived.set()
        await self.release.wait()
        return "late"


@dataclass
class Crew:
    """An app on its own transport, its nodes' targets, and the timeout interceptor."""

    app: Any
    timeout: TimeoutInterceptor
    gate: Gate
    targets: dict[str, str]

    def counts(self) -> tuple[int, int]:
        """(subscriptions, handlers) of the transport right now."""
        stats = self.app.transport.statistics()
        return stats.subscriptions, stats.handlers


@pytest.fixture
async def crew(url: str) -> AsyncIterator[Crew]:
    """An HALoomApp with echo, picky and gate nodes (unique names: shared servers keep
    durable groups), a 30 s reply timeout, started; closed after the test."""
    transport = loom_transport(url)
    app = HALoomApp(transport=transport)
    timeout = TimeoutInterceptor(default_timeout_sec=30.0)
    app.dispatcher.add_interceptor(timeout)
    suffix = uuid.uuid4().hex[:8]
    gate = Gate(f"gate-{suffix}", app.dispatcher)
    nodes: list[Any] = [
        Echo(f"echo-{suffix}", app.dispatcher),
        Picky(f"picky-{suffix}", app.dispatcher),
        gate,
    ]
    try:
        await start_nodes(app, *nodes)
        yield Crew(
            app, timeout, gate, {n.node_id.split("-")[0]: f"node/{n.node_id}" for n in nodes}
        )
    finally:
        gate.release.set()
        await transport.close()


async def test_sequential_runs_leave_no_handler_behind(crew: Crew, url: str) -> None:
    """Thousands of sequential app.run calls keep the transport's subscription and
    handler counts where they were, and each reply is delivered once, to its caller."""
    runs = MEMORY_RUNS if url == "memory://" else BROKER_RUNS
    echo = crew.targets["echo"]
    baseline = crew.counts()
    delivered = crew.app.transport.statistics().delivered
    for i in range(runs):
        assert await crew.app.run(str(i), target=echo) == f"echo: {i}"
        assert crew.counts() == baseline, f"after call {i + 1}: {crew.counts()} != {baseline}"
    # Each call: its request to the node, its reply to the caller's one handler.
    assert crew.app.transport.statistics().delivered - delivered == 2 * runs


async def test_concurrent_runs_share_one_reply_handler(crew: Crew) -> None:
    """Fifty concurrent calls to one node are each answered with their own result while
    a single reply handler (on the response and error topics) serves them all."""
    baseline_subscriptions = crew.counts()[0]
    seen: list[int] = []

    class Watched(Node):
        async def process(self, event: Any) -> Any:
            seen.append(crew.app.transport.statistics().subscriptions)
            return event.data["task"]

    node = Watched(f"watched-{uuid.uuid4().hex[:8]}", crew.app.dispatcher)
    await start_nodes(crew.app, node)
    baseline = crew.counts()
    target = f"node/{node.node_id}"
    results = await asyncio.gather(*(crew.app.run(str(i), target=target) for i in range(50)))
    assert results == [str(i) for i in range(50)]
    assert crew.counts() == baseline
    # While calls were in flight: the node's own subscription plus the app's two.
    assert set(seen) == {baseline_subscriptions + 1 + 2}, seen


async def test_node_error_reaches_the_caller(crew: Crew) -> None:
    """A node whose handler raises makes app.run raise NodeError with the node's message
    (not a TimeoutError after the 30 s timeout), and the reply handler is gone."""
    picky = crew.targets["picky"]
    baseline = crew.counts()
    with pytest.raises(NodeError) as caught:
        await crew.app.run("bad apple", target=picky)
    error = caught.value
    assert str(error) == error.error == "cannot do bad apple"
    assert error.target == picky
    assert error.source == f"/{picky}"
    uuid.UUID(error.request_id)  # the request's event id, a UUID like upstream's
    assert isinstance(error, RuntimeError)
    assert crew.counts() == baseline
    # The same node still answers what it can.
    assert await crew.app.run("good apple", target=picky) == "done: good apple"
    assert crew.counts() == baseline


async def test_concurrent_errors_and_results_go_to_their_own_callers(crew: Crew) -> None:
    """Concurrent calls to one node, half failing, each get their own outcome."""
    picky = crew.targets["picky"]
    baseline = crew.counts()
    tasks = [f"bad {i}" if i % 2 else f"ok {i}" for i in range(40)]
    outcomes = await asyncio.gather(
        *(crew.app.run(t, target=picky) for t in tasks), return_exceptions=True
    )
    for task, outcome in zip(tasks, outcomes, strict=True):
        if task.startswith("bad"):
            assert isinstance(outcome, NodeError), (task, outcome)
            assert str(outcome) == f"cannot do {task}"
        else:
            assert outcome == f"done: {task}"
    assert crew.counts() == baseline


async def test_cancelled_run_removes_its_handlers(crew: Crew) -> None:
    """Cancelling app.run while it waits for a reply unsubscribes its reply handler."""
    baseline = crew.counts()
    call = asyncio.create_task(crew.app.run("hold", target=crew.targets["gate"]))
    await crew.gate.arrived.wait()  # the request is at the node: the call is waiting
    assert crew.counts()[0] > baseline[0], "the reply handler should be listening"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert crew.counts() == baseline
    crew.gate.release.set()  # its late reply finds nobody waiting
    assert await crew.app.run("after", target=crew.targets["echo"]) == "echo: after"
    assert crew.counts() == baseline


async def test_timed_out_run_removes_its_handlers(crew: Crew) -> None:
    """A run with no reply within extensions["timeout"] raises TimeoutError naming that
    timeout, and unsubscribes its reply handler."""
    baseline = crew.counts()
    crew.timeout.default_timeout_sec = 0.5
    gate = crew.targets["gate"]
    with pytest.raises(TimeoutError, match=rf"^Task targeting {gate} timed out after 0\.5s$"):
        await crew.app.run("hold", target=gate)
    assert crew.gate.arrived.is_set()  # the node had it: the reply was what was missing
    assert crew.counts() == baseline
    crew.timeout.default_timeout_sec = 30.0
    crew.gate.release.set()
    assert await crew.app.run("after", target=crew.targets["echo"]) == "echo: after"
    assert crew.counts() == baseline
