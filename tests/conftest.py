"""Guards every test runs under: true markers, and nothing left running after a test.

`-m "not redis and not nats and not consul"` is then a real server-free loop. The rules:

* a test that uses a server fixture gets its marker at collection;
* a test that starts a server any other way (`server_launcher`, a local cluster) without
  the marker fails, naming the marker to add, so a missing mark is found, not trusted;
* a test that leaves a thread or a child process running (a node process, a CLI, a client
  loop in a thread) fails, naming it: such a leftover keeps reconnecting and shows up as a
  stray client of a later test's server on a reused port.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loom_ha.testing._process import ServerProcess
from loom_ha.testing.consul_servers import ConsulAgent
from loom_ha.testing.nats_servers import NatsServer
from loom_ha.testing.redis_sentinel import RedisSentinel
from loom_ha.testing.redis_servers import RedisServer

FIXTURE_MARKERS = {
    "redis_server": "redis",
    "redis_sentinel": "redis",
    "nats_server": "nats",
    "nats_cluster": "nats",
    "consul_agent": "consul",
    "consul_cluster": "consul",
}
SERVER_MARKERS: tuple[tuple[type[ServerProcess], str], ...] = (
    (RedisServer, "redis"),
    (RedisSentinel, "redis"),
    (NatsServer, "nats"),
    (ConsulAgent, "consul"),
)

_running_test: list[pytest.Item] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by the server fixtures it uses (directly or through other fixtures)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in names:
                item.add_marker(marker)


@pytest.fixture(autouse=True)
def _server_marker_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    _running_test.append(request.node)
    try:
        yield
    finally:
        _running_test.pop()


_launch = ServerProcess.launch
_server_pids: set[int] = set()  # every server a fixture or launcher started: not leftovers
LEFTOVER_GRACE = 5.0  # s: a process or thread that is ending (SIGTERM sent, join pending)


def _children() -> dict[int, str]:
    """This process's live children (zombies excluded) and their command lines."""
    me, found = os.getpid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                pid = int(stat.parent.name)
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found[pid] = cmd.strip()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return found


def _leftovers(threads_before: set[int], children_before: set[int]) -> list[str]:
    threads = [
        f"thread {t.name!r}"
        for t in threading.enumerate()
        if t.ident not in threads_before and t.is_alive()
    ]
    procs = [
        f"child process {pid} ({cmd})"
        for pid, cmd in _children().items()
        if pid not in children_before and pid not in _server_pids
    ]
    return threads + procs


@pytest.fixture(autouse=True)
def _nothing_left_running() -> Iterator[None]:
    threads_before = {t.ident for t in threading.enumerate() if t.ident is not None}
    children_before = set(_children())
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE
    while (left := _leftovers(threads_before, children_before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for pid in _children():  # so the leftover cannot disturb the tests after this one
            if pid not in children_before and pid not in _server_pids:
                os.kill(pid, signal.SIGKILL)
        pytest.fail("left running after the test: " + "; ".join(left), pytrace=False)


def _guarded_launch(self: ServerProcess, *args: Any, **kwargs: Any) -> Any:
    if _running_test:
        item = _running_test[-1]
        for cls, marker in SERVER_MARKERS:
            if isinstance(self, cls) and item.get_closest_marker(marker) is None:
                pytest.fail(
                    f"{item.nodeid} starts a {type(self).__name__} without the {marker!r} "
                    f"marker: add @pytest.mark.{marker} so -m selections filter truly",
                    pytrace=False,
                )
    result = _launch(self, *args, **kwargs)
    if self.pid is not None:
        _server_pids.add(self.pid)
    return result


ServerProcess.launch = _guarded_launch  # type: ignore[method-assign]
