"""`HALoomApp`: loom-agent 0.3.4's `LoomApp` with a `run()` that cleans up and reports node errors.

This module imports loom: reach it through `loom_ha.loom.HALoomApp`, which loads it on first
use, so `import loom_ha` (and `loom_ha.loom`) keep working without the loom extra.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any
from uuid import uuid4

from loom.api.main import LoomApp
from loom.protocol.cloudevents import CloudEvent

from loom_ha._tasks import finish_all, honouring_cancel
from loom_ha.errors import NodeError
from loom_ha.tracing import operation

DEFAULT_RUN_TIMEOUT = 30.0
"""Seconds `run()` waits for a reply when no interceptor set ``extensions["timeout"]`` (Loom's)."""


class HALoomApp(LoomApp):  # type: ignore[misc]  # loom ships no type information
    """A `LoomApp` whose `run()` leaves no handler behind and raises a node's error at once.

    loom-agent 0.3.4's `LoomApp.run` subscribes a fresh reply handler to
    ``node.response/<target>`` on every call and never removes it: every later reply
    reaches every earlier caller's handler, so a long-running client slows down
    quadratically. It also listens on ``node.response`` only, while a node publishes its
    failure on ``node.error/<target>``, so a failing node looks like a 30 s timeout.

    Here, while calls to a target are in flight, the app holds one handler on that
    target's ``node.response`` and ``node.error`` topics and hands each reply to the call
    it answers (by ``data["request_id"]``, like upstream); when the last call returns,
    raises, times out or is cancelled, the handler is unsubscribed. One handler per
    target rather than one per call: concurrent calls do not each receive every reply.
    `run()` keeps upstream's signature, return value and timeout source.

    It is a subclass rather than a patch of `loom.api.main.LoomApp`: the fix shows where
    the app is built, applies only to apps that ask for it (not to other libraries' Loom
    apps in the same process, nor depending on import order), and fails loudly rather than
    silently if a future loom-agent reshapes `LoomApp`. Everything else (`start`, `on`,
    the dispatcher and its interceptors, `Node.call`) is upstream's, untouched.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routes: dict[str, _ReplyRoute] = {}

    async def run(self, task: str, target: str) -> Any:
        """Send `task` to the node `target` (``"node/echo"``) and return its result.

        Args:
            task: the request's ``data["task"]``.
            target: the node's URI, as in ``node.request/<target>``.

        Returns:
            The node's ``data["result"]``.

        Raises:
            NodeError: the node's handler failed (its ``node.error`` reply).
            TimeoutError: no reply within ``extensions["timeout"]`` seconds (set by an
                interceptor such as Loom's `TimeoutInterceptor`; else 30 s), or the
                request could not be published within it.

        Safe to call concurrently. Every way out (cancellation included) gives up the
        call's share of the reply subscription.
        """
        await self.start()
        request_id = str(uuid4())
        # With a tracer provider set, the root of the call's trace (loom_ha.tracing).
        with operation(f"run {target}", {"loom.target": target, "loom.request_id": request_id}):
            event = CloudEvent.create(
                source="/user/sdk", type="node.request", data={"task": task}, subject=target
            )
            event.id = request_id
            subject = target.strip("/")
            route = self._routes.get(subject)
            if route is None:
                route = self._routes[subject] = _ReplyRoute(subject)
            reply = route.expect(request_id, target)
            try:
                await route.open(self.bus)
                # Loom publishes through asyncio.wait_for, which may swallow a cancel (3.11).
                await honouring_cancel(self.dispatcher.dispatch(event))
                timeout = _timeout_of(event)
                try:
                    async with asyncio.timeout(timeout):
                        return await reply
                except TimeoutError:
                    message = f"Task targeting {target} timed out after {timeout}s"
                    raise TimeoutError(message) from None
            finally:
                await route.close(self.bus, request_id)
                if route.idle and self._routes.get(subject) is route:
                    del self._routes[subject]


class _ReplyRoute:
    """Replies from one target: a single handler on its reply topics while calls wait.

    `open()` / `close()` bracket each call. The handler is subscribed when the first call
    opens (before its request is sent, as the transport contract needs) and unsubscribed
    when the last one closes.
    """

    def __init__(self, subject: str) -> None:
        # A node answers on node.response/<its uri> and fails on node.error/<its uri>.
        self.topics = (f"node.response/{subject}", f"node.error/{subject}")
        self._waiting: dict[str, tuple[asyncio.Future[Any], str]] = {}
        self._users = 0
        self._subscribed: set[str] = set()
        self._lock = asyncio.Lock()
        self._handler = self.handle  # one bound method: transports compare handlers

    @property
    def idle(self) -> bool:
        """No call is using the route and its handler is not subscribed."""
        return self._users == 0 and not self._subscribed

    def expect(self, request_id: str, target: str) -> asyncio.Future[Any]:
        """The future the reply to `request_id` will settle."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (future, target)
        return future

    async def open(self, bus: Any) -> None:
        """Make sure the handler listens on both topics (the broker confirmed it)."""
        self._users += 1  # before any await: close() undoes it whatever happens here
        async with self._lock:
            for topic in self.topics:
                if topic not in self._subscribed:
                    await bus.subscribe(topic, self._handler)
                    self._subscribed.add(topic)

    async def close(self, bus: Any, request_id: str) -> None:
        """Forget `request_id`; the last call out unsubscribes the handler."""
        self._waiting.pop(request_id, None)
        self._users -= 1
        if self._users:
            return
        async with self._lock:
            if self._users:  # a call opened while we waited: the subscription stays
                return
            # Both topics, even unrecorded ones: an open() cancelled mid-subscribe may have
            # left one half-made, and unsubscribing an unknown pair is a no-op. Each runs to
            # its end, also when this call is the clean-up of a cancelled run().
            steps = [partial(bus.unsubscribe, t, self._handler) for t in reversed(self.topics)]
            await finish_all(*steps, owner="loom_ha.loom")
            self._subscribed.clear()

    async def handle(self, event: Any) -> None:
        """Settle the call `event` answers; replies to other calls are ignored."""
        data = event.data
        if not isinstance(data, dict):
            return
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or request_id not in self._waiting:
            return
        future, target = self._waiting[request_id]
        if future.done():  # a second reply (redelivery, fan-out): the first one won
            return
        if event.type == "node.error":
            error = NodeError(
                str(data.get("error", "Unknown Error")),
                target=target,
                request_id=request_id,
                source=str(event.source),
            )
            future.set_exception(error)
        else:
            future.set_result(data.get("result"))


def _timeout_of(event: Any) -> float:
    """Upstream's rule: a numeric ``extensions["timeout"]`` if present, else 30 s."""
    extensions = event.extensions
    if extensions and "timeout" in extensions:
        with contextlib.suppress(ValueError, TypeError):
            return float(extensions["timeout"])
    return DEFAULT_RUN_TIMEOUT
