"""Core NATS: subscribe() is effective when it returns (also under races), and handler calls.

A SlowLink delays the subscriber's SUB commands on the wire, so a transport that
reports a subscription as effective too early loses the event published next. The
handler tests pin what the inline delivery path must keep: isolation, one call at a
time, self-unsubscribe, a handler's own CancelledError, disconnect waiting for calls.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from loom_ha.event import CloudEvent
from loom_ha.nats import NatsCoreTransport
from loom_ha.testing.collect import Collector
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import NatsServer

from ._relay import SlowLink

pytestmark = pytest.mark.nats


@pytest.fixture
def topic() -> str:
    """A topic no other test uses."""
    return f"core.{uuid.uuid4().hex[:10]}/node/x"


def _event(n: int = 0) -> CloudEvent:
    return CloudEvent.create(source="/test/core", type="core.test", data={"n": n})


async def _server_subjects(server: NatsServer, name: str) -> list[str]:
    """Subjects the server holds for the connection called `name`."""
    connz: Any = await asyncio.to_thread(server.monitor, "connz?subs=1")
    for conn in connz.get("connections", []):
        if conn.get("name") == name:
            return list(conn.get("subscriptions_list", []))
    raise AssertionError(f"no connection named {name!r}")


async def _until_server_dropped(server: NatsServer, name: str, subject: str) -> None:
    """Poll the server's view until the connection `name` no longer holds `subject`."""
    for _ in range(100):  # the UNSUB is on its way; the monitoring port has no push
        if subject not in await _server_subjects(server, name):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server still holds {subject!r} for {name!r}")


async def test_subscribe_is_effective_when_it_returns(nats_server: NatsServer, topic: str) -> None:
    """An event published right after subscribe() returns arrives, even if the SUB is slow.

    nats-py's flush() writes its PING ahead of the buffered SUB, so a PONG alone
    proves nothing; the transport must wait for a round trip queued behind the SUB.
    """
    got = Collector()
    async with (
        SlowLink(nats_server.url) as link,
        NatsCoreTransport([link.url]) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):
        before = link.delayed
        await sub.subscribe(topic, got)
        assert link.delayed > before, "the SUB did not cross the slow link"
        event = _event()
        await pub.publish(topic, event)
        await got.wait_for(1, within=5)
    assert got.ids == [event.id]


async def test_concurrent_subscribers_of_a_pattern_all_wait_for_the_server(
    nats_server: NatsServer, topic: str
) -> None:
    """A second subscribe() of a pattern whose native subscription is still being set up
    returns only once it is effective (Loom's start-up subscribes each node twice)."""
    first, second = Collector("first"), Collector("second")
    async with (
        SlowLink(nats_server.url) as link,
        NatsCoreTransport([link.url]) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):
        joining = asyncio.create_task(sub.subscribe(topic, first))
        await asyncio.sleep(0)  # the first call now waits for the server
        await sub.subscribe(topic, second)
        event = _event()
        await pub.publish(topic, event)
        await second.wait_for(1, within=5)
        await joining
        await first.wait_for(1, within=5)
    assert second.ids == first.ids == [event.id]


async def test_resubscribing_while_unsubscribing_keeps_exactly_one_native_subscription(
    nats_server: NatsServer, topic: str
) -> None:
    """Subscribing a pattern while its last handler is being unsubscribed (Loom subscribes and
    unsubscribes a response topic around every call) leaves one live native subscription,
    and unsubscribing that handler removes it from the server."""
    leaving, staying = Collector("leaving"), Collector("staying")
    name = f"resub-{uuid.uuid4().hex[:8]}"
    async with (
        NatsCoreTransport([nats_server.url], name=name) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):
        await sub.subscribe(topic, leaving)
        going = asyncio.create_task(sub.unsubscribe(topic, leaving))
        await asyncio.sleep(0)  # the unsubscribe is now tearing the native subscription down
        await sub.subscribe(topic, staying)
        await going
        assert sub.statistics().extra["native_subscriptions"] == 1  # type: ignore[index]
        event = _event()
        await pub.publish(topic, event)
        await staying.wait_for(1, within=5)
        await sub.unsubscribe(topic, staying)
        assert sub.statistics().extra["native_subscriptions"] == 0  # type: ignore[index]
        await _until_server_dropped(nats_server, name, sub.subjects.subject(topic))
    assert staying.ids == [event.id] and leaving.ids == []


async def test_slow_handler_holds_back_only_itself(nats_server: NatsServer, topic: str) -> None:
    """A handler stuck in a call delays neither another handler of its topic nor a
    handler of another topic; its own events wait and then arrive in order."""
    release = asyncio.Event()
    stuck, same_topic, other_topic = Collector("stuck"), Collector("same"), Collector("other")

    async def slow(event: Any) -> None:
        await stuck(event)
        await release.wait()

    async with (
        NatsCoreTransport([nats_server.url]) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):
        await sub.subscribe(topic, slow)
        await sub.subscribe(topic + "/other", other_topic)
        first = _event(0)
        await pub.publish(topic, first)
        await stuck.wait_for(1)  # `slow` is now inside its call (alone on its topic)
        await sub.subscribe(topic, same_topic)
        later = [_event(n) for n in range(1, 4)]
        for event in later:
            await pub.publish(topic, event)
            await pub.publish(topic + "/other", event)
        await other_topic.wait_for(3, within=5)
        # same_topic joined `slow`'s topic mid-call: its events wait for that call (documented)
        release.set()
        await same_topic.wait_for(3, within=5)
        await stuck.wait_for(4, within=5)
    assert stuck.ids == [first.id] + [e.id for e in later]
    assert same_topic.ids == other_topic.ids == [e.id for e in later]


async def test_a_handler_never_runs_twice_at_once(nats_server: NatsServer, topic: str) -> None:
    """A handler on two topics runs one call at a time, also when one topic delivers it in
    the subscription's own task and the other through its mailbox."""
    running, peak, seen = 0, 0, Collector()
    release = asyncio.Event()

    async def handler(event: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await seen(event)
        if event.data["n"] == 0:
            await release.wait()
        await asyncio.sleep(0)
        running -= 1

    async with (
        NatsCoreTransport([nats_server.url]) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):
        await sub.subscribe(topic, handler)
        await pub.publish(topic, _event(0))
        await seen.wait_for(1)  # inside its first call, alone on `topic`
        await sub.subscribe(topic + "/b", handler)
        # Another handler on its own pattern over both subjects: not held up by `handler`.
        witness = Collector("witness")
        await sub.subscribe(topic + "*", witness)
        for n in range(1, 6):
            await pub.publish(topic + "/b", _event(n))
            await pub.publish(topic, _event(10 + n))
        # Every event reached the subscriber and was dispatched (not a timed settle).
        await witness.wait_for(10)
        assert len(seen.events) == 1, "ran again while its first call was not over"
        release.set()
        await seen.wait_for(11, within=5)
    assert peak == 1
    ns = [e.data["n"] for e in seen.events]
    assert [n for n in ns if 0 < n < 10] == [1, 2, 3, 4, 5]
    assert [n for n in ns if n > 10] == [11, 12, 13, 14, 15]


async def test_a_handler_may_unsubscribe_itself_and_finish(
    nats_server: NatsServer, topic: str
) -> None:
    """A handler that unsubscribes itself finishes its call (it is not cancelled), gets no
    further event, and its subscription is gone from the server."""
    finished = asyncio.Event()
    name = f"self-unsub-{uuid.uuid4().hex[:8]}"
    calls: list[int] = []

    async with (
        NatsCoreTransport([nats_server.url], name=name) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):

        async def once(event: Any) -> None:
            calls.append(event.data["n"])
            await sub.unsubscribe(topic, once)
            await asyncio.sleep(0.05)  # still inside the call after unsubscribing
            finished.set()

        await sub.subscribe(topic, once)
        for n in range(3):
            await pub.publish(topic, _event(n))
        async with asyncio.timeout(5):
            await finished.wait()
        await _until_server_dropped(nats_server, name, sub.subjects.subject(topic))
        stats = sub.statistics()
    assert calls == [0]
    assert stats.handler_errors == 0 and stats.delivered == 1


async def test_a_handlers_own_cancelled_error_does_not_stop_delivery(
    nats_server: NatsServer, topic: str
) -> None:
    """A handler that raises CancelledError on its own (it awaited a cancelled future) is
    counted as failing; the transport keeps delivering to it."""
    got = Collector()

    async def sometimes_cancelled(event: Any) -> None:
        await got(event)
        if event.data["n"] == 0:
            doomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            doomed.cancel()
            await doomed

    async with (
        NatsCoreTransport([nats_server.url]) as sub,
        NatsCoreTransport([nats_server.url]) as pub,
    ):
        await sub.subscribe(topic, sometimes_cancelled)
        for n in range(3):
            await pub.publish(topic, _event(n))
        await got.wait_for(3, within=5)
        assert sub.statistics().handler_errors == 1


async def test_disconnect_waits_for_handler_calls_to_end(
    nats_server: NatsServer, topic: str
) -> None:
    """disconnect() cancels a handler that is inside a call and returns after it ended."""
    entered, cleaned_up = asyncio.Event(), asyncio.Event()

    async def stuck(event: Any) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a moment
            cleaned_up.set()

    tasks_before = len(asyncio.all_tasks())
    async with NatsCoreTransport([nats_server.url]) as pub:
        sub = NatsCoreTransport([nats_server.url])
        await sub.connect()
        await sub.subscribe(topic, stuck)
        await pub.publish(topic, _event())
        async with asyncio.timeout(5):
            await entered.wait()
        await sub.disconnect()
        assert cleaned_up.is_set()
    assert len(asyncio.all_tasks()) == tasks_before


class _NoInboxPublishServer(NatsServer):
    """A nats-server whose only user may not publish to ``_INBOX.>`` (a locked-down account)."""

    def _prepare(self) -> None:
        super()._prepare()
        (self.workdir / "perms.conf").write_text(
            'authorization { users = [ { user: "app", password: "pw", '
            'permissions: { publish: { allow: ">", deny: "_INBOX.>" }, subscribe: ">" } } ] }\n'
        )

    def _command(self) -> list[str]:
        return [*super()._command(), "-c", str(self.workdir / "perms.conf")]


async def test_an_account_that_may_not_publish_to_its_inbox_still_subscribes(
    server_launcher: ServerLauncher, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When the server refuses the subscribe barrier's probe, subscribe() falls back to
    PING/PONG with a warning instead of failing or hanging."""
    server = await asyncio.to_thread(server_launcher.start, _NoInboxPublishServer())
    got = Collector()
    caplog.set_level(logging.WARNING, logger="loom_ha.nats")
    async with (
        NatsCoreTransport([server.url], user="app", password="pw", connect_timeout=2.0) as sub,
        NatsCoreTransport([server.url], user="app", password="pw") as pub,
    ):
        async with asyncio.timeout(5):
            await sub.subscribe(topic, got)
            await sub.subscribe(topic + "/second", got)  # straight to the fallback now
        await pub.publish(topic, _event(0))
        await pub.publish(topic + "/second", _event(1))
        await got.wait_for(2, within=5)
    assert "falling back to PING/PONG" in caplog.text
