"""Markers that filter truly: every test that needs a broker carries that broker's marker.

`-m "not redis and not nats and not consul"` is then a real server-free loop. Two rules:

* a test that uses a server fixture gets its marker at collection;
* a test that starts a server any other way (`server_launcher`, a local cluster) without
  the marker fails, naming the marker to add, so a missing mark is found, not trusted.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    return _launch(self, *args, **kwargs)


ServerProcess.launch = _guarded_launch  # type: ignore[method-assign]
