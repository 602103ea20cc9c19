"""The partition fixture itself: a cut really drops traffic both ways, heal restores it (open
TCP connections included), and nothing it made outlives it.

No broker here: an echo server in the test process and one inside a member namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading

import pytest

from loom_ha.testing._iproute import HOST_LINK, PREFIX, ip, sweep
from loom_ha.testing.netns import Member, Network, NetworkError

pytest_plugins = ["pytester"]

PORT = 7000  # inside namespaces this test made: nothing else listens there
CUT = 1.0
"""Seconds a connection attempt across a cut is given: on a healthy link it takes
microseconds, so running out of it means the packets vanished."""


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(100):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _reaches(address: str, port: int = PORT) -> str:
    """'ok' when a TCP connection to (address, port) echoes, else what happened."""
    try:
        async with asyncio.timeout(CUT):
            reader, writer = await asyncio.open_connection(address, port)
            writer.write(b"ping")
            echoed = await reader.readexactly(4)
            writer.close()
            await writer.wait_closed()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    return "ok" if echoed == b"ping" else f"echoed {echoed!r}"


async def _serve_until(member: Member, stop: threading.Event, ready: threading.Event) -> None:
    """An echo server on `member`'s address until `stop` is set (runs inside the member)."""

    async def body() -> None:
        server = await asyncio.start_server(_echo, member.address, PORT)
        ready.set()
        async with server:
            while not stop.is_set():  # noqa: ASYNC110 - a threading.Event crosses loops
                await asyncio.sleep(0.02)

    await member.run(body)


async def _from(member: Member, address: str) -> str:
    return await member.run(lambda: _reaches(address))


async def test_partition_drops_traffic_silently_and_heal_restores_it(
    netns_network: Network,
) -> None:
    """Across a cut connections time out in both directions (no refusal, no reset), within
    a side they work, and after heal() everything connects again."""
    net = netns_network
    a, b = net.add("a"), net.add("b")
    host = net.host
    server = await asyncio.start_server(_echo, host.address, PORT)
    stop, ready = threading.Event(), threading.Event()
    async with server, asyncio.TaskGroup() as tg:
        serving = tg.create_task(_serve_until(a, stop, ready))
        while not ready.is_set():  # noqa: ASYNC110 - set by another thread's loop
            await asyncio.sleep(0.01)
        try:
            before = [
                await _reaches(a.address),
                await _from(b, a.address),
                await _from(a, host.address),
            ]
            net.partition([a])
            cut = [
                await _reaches(a.address),
                await _from(b, a.address),
                await _from(a, host.address),
                await _from(b, host.address),
            ]
            net.heal()
            after = [
                await _reaches(a.address),
                await _from(b, a.address),
                await _from(a, host.address),
            ]
        finally:
            stop.set()
        await serving
    print(f"\n[partition] before={before} cut={cut} healed={after}")
    assert before == ["ok", "ok", "ok"]
    assert cut == ["timeout", "timeout", "timeout", "ok"]
    assert after == ["ok", "ok", "ok"]
    assert net.connected(a, b) and net.connected(host, a)


async def test_open_connection_stalls_across_a_cut_and_resumes_after_heal(
    netns_network: Network,
) -> None:
    """A TCP connection open across the cut is neither reset nor answered; after heal() the
    bytes sent meanwhile arrive on the same connection (retransmission)."""
    net = netns_network
    member = net.add("m")
    stop, ready = threading.Event(), threading.Event()
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(_serve_until(member, stop, ready))
        while not ready.is_set():  # noqa: ASYNC110 - set by another thread's loop
            await asyncio.sleep(0.01)
        try:
            reader, writer = await asyncio.open_connection(member.address, PORT)
            net.isolate(member)
            writer.write(b"lost?")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(CUT):
                    await reader.readexactly(5)
            net.heal()
            async with asyncio.timeout(30):  # TCP's retransmission backoff: seconds at most
                echoed = await reader.readexactly(5)
            writer.close()
            await writer.wait_closed()
        finally:
            stop.set()
        await serving
    assert echoed == b"lost?"


def _namespaces() -> set[str]:
    return set(ip("netns", "list").split()) - {"(id:"}


def _links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link").splitlines()}


def test_stop_removes_every_namespace_link_and_route_even_after_an_error() -> None:
    """Leaving the network's `with` block (here by an exception) deletes its namespaces, its
    host link and its guard route; the subnet is no longer routed here."""
    with pytest.raises(RuntimeError, match="boom"), Network() as net:
        net.add("x")
        net.add("y")
        made = list(net.namespaces)
        link = net._host_link
        subnet = str(net.subnet)
        assert set(made) <= _namespaces() and link in _links()
        assert subnet in ip("-4", "route", "show")
        raise RuntimeError("boom")
    assert len(made) == 3  # x, y and the switch
    assert not set(made) & _namespaces()
    assert link not in _links()
    assert subnet not in ip("-4", "route", "show", "table", "all")


def test_sweep_removes_leftovers_of_dead_processes_only() -> None:
    """`sweep()` deletes namespaces and host links named after a pid that is gone, and
    leaves those of a live process (this one) alone."""
    dead = _dead_pid()
    stale_ns, live_ns = f"{PREFIX}-{dead}-1-stale", f"{PREFIX}-{os.getpid()}-999-live"
    stale_link = f"lh{dead:x}-1"
    assert HOST_LINK.match(stale_link)
    ip("netns", "add", stale_ns)
    ip("netns", "add", live_ns)
    ip("link", "add", stale_link, "type", "veth", "peer", "name", f"{stale_link}p")
    try:
        removed = sweep()
        assert stale_ns in removed and stale_link in removed
        assert stale_ns not in _namespaces() and stale_link not in _links()
        assert live_ns in _namespaces()
    finally:
        for step in (["netns", "delete", stale_ns], ["netns", "delete", live_ns]):
            with contextlib.suppress(NetworkError):
                ip(*step)
        if stale_link in _links():
            ip("link", "delete", stale_link)


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (not reused this quickly)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_run_inside_a_member_is_cancelled_and_its_thread_joined(
    netns_network: Network,
) -> None:
    """Cancelling `Member.run` cancels the coroutine in the member's thread and waits for it:
    no thread is left behind (the conftest checks), and the coroutine saw the cancellation."""
    member = netns_network.add("c")
    started, saw_cancel = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    task = asyncio.create_task(member.run(forever))
    while not started.is_set():  # noqa: ASYNC110 - set by another thread's loop
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert saw_cancel.is_set()


def test_without_root_the_fixture_fails_naming_the_reason(pytester: pytest.Pytester) -> None:
    """Not root: a test using `netns_network` fails (never skips) with the reason."""
    pytester.makeconftest(
        "import os, pytest\n"
        "@pytest.fixture(autouse=True)\n"
        "def not_root(monkeypatch):\n"
        "    monkeypatch.setattr(os, 'geteuid', lambda: 1000)\n"
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile("def test_uses_it(netns_network):\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*network partitions need root*uid 1000*"])
