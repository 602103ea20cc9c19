"""The lifecycle half of the conformance suite: connect, disconnect, close, cancellation.

`TransportConformance` inherits it; the contract it holds every backend to: `connect()` and
`disconnect()` are idempotent, `disconnect()` may be followed by `connect()`, `close()` is
terminal, and neither leaves a task or socket behind, even when a handler swallowed its
cancellation.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from loom_ha.errors import NotConnectedError, TransportClosedError
from loom_ha.testing.backend import Backend, make_event, publish_one
from loom_ha.testing.collect import Collector
from loom_ha.transport import TransportState

# A bound on waiting for close() and a subscribe racing it: a guard against the hang a
# retry loop on a closed connection caused (never returned), not a measurement.
HANG_GUARD = 30.0


def _tasks() -> set[asyncio.Task[Any]]:
    """Tasks of the running loop other than the test's own."""
    return asyncio.all_tasks() - {asyncio.current_task()}


def _socket_fds() -> int | None:
    """Open sockets of this process (Linux), to check that nothing leaks."""
    try:
        entries = os.listdir("/proc/self/fd")
    except OSError:
        return None
    count = 0
    for entry in entries:
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


class LifecycleConformance:
    """Lifecycle behaviours every transport shows (needs `backend` and `prefix` fixtures)."""

    async def test_publish_before_connect_raises(self, backend: Backend, prefix: str) -> None:
        """publish() and subscribe() before connect() raise NotConnectedError."""
        transport = backend.factory()
        with pytest.raises(NotConnectedError):
            await transport.publish(prefix + "x", make_event())
        with pytest.raises(NotConnectedError):
            await transport.subscribe(prefix + "x", Collector())
        await transport.disconnect()  # idempotent, even when never connected

    async def test_connect_and_disconnect_are_idempotent(self, backend: Backend) -> None:
        """connect() twice and disconnect() twice are harmless: the state says so after each
        call, the second connect() opens nothing more, and no task or socket is left."""
        tasks_before, sockets_before = _tasks(), _socket_fds()
        transport = backend.factory()
        try:
            assert transport.statistics().state is TransportState.NEW
            await transport.connect()
            assert transport.statistics().state is TransportState.CONNECTED
            tasks_connected, sockets_connected = _tasks(), _socket_fds()
            await transport.connect()
            assert transport.statistics().state is TransportState.CONNECTED
            assert _tasks() == tasks_connected, "a second connect() started tasks"
            assert _socket_fds() == sockets_connected, "a second connect() opened sockets"
        finally:
            await transport.disconnect()
        assert transport.statistics().state is TransportState.DISCONNECTED
        await transport.disconnect()
        assert transport.statistics().state is TransportState.DISCONNECTED
        assert _tasks() == tasks_before, "disconnect() left tasks behind"
        assert _socket_fds() == sockets_before, "disconnect() left sockets open"

    async def test_disconnect_then_connect_works_again(self, backend: Backend, prefix: str) -> None:
        """disconnect() is not the end: connect() again, subscribe, and events flow."""
        pub = backend.factory()
        sub = backend.factory() if backend.capabilities.cross_instance else pub
        await pub.connect()
        try:
            for round_ in range(2):
                got = Collector(f"round {round_}")
                await sub.connect()
                await sub.subscribe(prefix + "again", got)
                sent = await publish_one(pub, prefix + "again")
                await got.wait_for(1)
                assert sent in got.ids
                await sub.disconnect()
                assert sub.statistics().state is TransportState.DISCONNECTED
        finally:
            await sub.disconnect()
            await pub.disconnect()

    async def test_close_is_terminal(self, backend: Backend) -> None:
        """close() means for good, whether the transport ever connected or not: the state is
        CLOSED and connect() raises TransportClosedError; close() again is harmless."""
        never, used = backend.factory(), backend.factory()
        await never.close()
        await used.connect()
        await used.close()
        await used.close()
        for transport in (never, used):
            assert transport.statistics().state is TransportState.CLOSED
            with pytest.raises(TransportClosedError):
                await transport.connect()
            await transport.disconnect()  # harmless, stays closed
            assert transport.statistics().state is TransportState.CLOSED

    async def test_state_changes_are_announced(self, backend: Backend) -> None:
        """State listeners hear every change as it happens, so no layer has to poll:
        connect() ends in CONNECTED, disconnect() in DISCONNECTED, close() in CLOSED, each
        announced before the call returns; a removed listener hears nothing more."""
        transport = backend.factory()
        seen: list[TransportState] = []
        remove = transport.add_state_listener(seen.append)
        assert remove is not None, f"{backend.name} does not announce its state"
        await transport.connect()
        assert seen[-1:] == [TransportState.CONNECTED], seen
        await transport.disconnect()
        assert seen[-1:] == [TransportState.DISCONNECTED], seen
        await transport.connect()
        assert seen[-1:] == [TransportState.CONNECTED], seen
        remove()
        heard = len(seen)
        await transport.close()
        assert len(seen) == heard, seen
        assert transport.statistics().state is TransportState.CLOSED

    async def test_unsubscribe_completes_in_the_clean_up_of_a_cancelled_task(
        self, backend: Backend, prefix: str
    ) -> None:
        """A task cancelled while waiting unsubscribes two topics in its `finally`, as
        LoomApp's reply handler does: each unsubscribe runs to its end although the task is
        still marked as being cancelled, and no subscription or handler is left behind."""
        topics = (prefix + "cleanup/a", prefix + "cleanup/b")
        async with backend.factory() as transport:
            baseline = transport.statistics()
            handler = Collector()
            for topic in topics:
                await transport.subscribe(topic, handler)
                await publish_one(transport, topic)
            await handler.wait_for(2)  # the readers are at work (Redis: blocked again)
            waiting = asyncio.Event()

            async def waiting_call() -> None:
                try:
                    waiting.set()
                    await asyncio.sleep(3600)
                finally:
                    for topic in topics:
                        await transport.unsubscribe(topic, handler)

            call = asyncio.create_task(waiting_call())
            await waiting.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            after = transport.statistics()
            assert (after.subscriptions, after.handlers) == (
                baseline.subscriptions,
                baseline.handlers,
            ), after

    async def test_disconnect_finishes_when_a_handler_swallows_cancellation(
        self, backend: Backend, prefix: str
    ) -> None:
        """A handler that catches `CancelledError` and returns (Loom 0.3.4's request handler
        can, through Python 3.11's `wait_for`) cannot keep disconnect() waiting or leave its
        delivery task behind."""
        tasks_before = _tasks()
        inside, swallowed = asyncio.Event(), asyncio.Event()

        async def swallowing(event: Any) -> None:
            inside.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed.set()  # and return normally: the cancellation is dropped

        sub, pub = backend.factory(), backend.factory()
        if not backend.capabilities.cross_instance:
            pub = sub
        await sub.connect()
        await pub.connect()
        try:
            await sub.subscribe(prefix + "stuck", swallowing)
            await publish_one(pub, prefix + "stuck")
            async with asyncio.timeout(10):
                await inside.wait()
            async with asyncio.timeout(30):  # a hang is the failure; 30 s bounds the test
                await sub.disconnect()
            assert swallowed.is_set()
        finally:
            await pub.disconnect()
            await sub.disconnect()
        assert _tasks() == tasks_before, "a delivery task outlived disconnect()"

    async def test_close_during_a_subscribe_ends_both_cleanly(
        self, backend: Backend, prefix: str
    ) -> None:
        """close() from another task while subscribe() is under way (Loom's `Node.__init__`
        subscribes in a task nobody awaits): both return; the subscribe took effect or
        raised the lifecycle error that says why, never an internal one; nothing is left."""
        tasks_before = _tasks()
        for ticks in range(0, 30, 3):  # close before, between and after its round trips
            transport = backend.factory()
            await transport.connect()
            subscribing = asyncio.ensure_future(
                transport.subscribe(f"{prefix}race{ticks}", Collector())
            )
            for _ in range(ticks):
                await asyncio.sleep(0)
            async with asyncio.timeout(HANG_GUARD):
                await transport.close()
                (outcome,) = await asyncio.gather(subscribing, return_exceptions=True)
            lifecycle_error = isinstance(outcome, TransportClosedError | NotConnectedError)
            assert outcome is None or lifecycle_error, f"ticks={ticks}: {outcome!r}"
        assert _tasks() == tasks_before, "close() left a task behind"

    async def test_disconnect_leaves_nothing_behind(self, backend: Backend, prefix: str) -> None:
        """After disconnect() no task and no socket of the transport is left."""
        tasks_before = len(asyncio.all_tasks())
        sockets_before = _socket_fds()
        got = Collector()
        async with backend.peers(2) as (sub, pub):
            await sub.subscribe(prefix + "a", got)
            await sub.subscribe(prefix + "*", got)
            await publish_one(pub, prefix + "a")
            await got.wait_for(1)
        assert len(asyncio.all_tasks()) == tasks_before, asyncio.all_tasks()
        if sockets_before is not None:
            assert _socket_fds() == sockets_before
        assert sub.statistics().subscriptions == 0
