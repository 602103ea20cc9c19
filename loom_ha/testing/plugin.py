"""pytest plugin (entry point `pytest11`): real-server fixtures for loom-ha and its users.

Session fixtures share one instance per server kind; `server_launcher` starts private instances
for tests that kill, pause or restart them. A missing server binary fails the test (never skips):
install them with `scripts/install-servers`. The launchers are imported lazily, so loading
this plugin costs nothing in test runs that use no server.

Async tests (pytest-asyncio) run on asyncio's loop unless ``--loom-ha-loop=uvloop`` (or
``auto``) or ``LOOM_HA_LOOP`` asks for uvloop: installing loom-ha must not change the loop of
a test suite that did not ask (the CLI, an application, defaults to uvloop when installed).
A ``pytest_asyncio_loop_factories`` hook of your own (in a conftest) takes precedence.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest

from loom_ha._loop import LOOP_CHOICES, LOOP_ENV, EventLoopChoice, choose_loop
from loom_ha.errors import ConfigurationError

from ._loop import loop_factory_for_tests

if TYPE_CHECKING:
    from .netns import Network
    from .servers import (
        ConsulAgent,
        ConsulCluster,
        NatsCluster,
        NatsServer,
        RedisSentinelCluster,
        RedisServer,
    )

__all__ = [
    "ServerLauncher",
    "consul_agent",
    "consul_cluster",
    "nats_cluster",
    "nats_server",
    "netns_network",
    "redis_sentinel",
    "redis_server",
    "server_launcher",
]


_EVENT_LOOP = pytest.StashKey[EventLoopChoice]()
_LOOP_FACTORY = pytest.StashKey[Callable[[], asyncio.AbstractEventLoop]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("loom-ha").addoption(
        "--loom-ha-loop",
        choices=LOOP_CHOICES,
        default=None,
        help=f"event loop of async tests (default ${LOOP_ENV}, else asyncio)",
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        chosen = choose_loop(
            config.getoption("loom_ha_loop"), flag_name="--loom-ha-loop", default="asyncio"
        )
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_EVENT_LOOP] = chosen
    config.stash[_LOOP_FACTORY] = loop_factory_for_tests(chosen)


def pytest_report_header(config: pytest.Config) -> str:
    if config.hook.pytest_asyncio_loop_factories.spec is None:  # no pytest-asyncio >= 1.4
        return "loom-ha: async tests on pytest-asyncio's own loop (choosing needs >= 1.4)"
    return f"loom-ha: event loop {config.stash[_EVENT_LOOP].description}"


# pytest-asyncio's documented way to choose the loop (since 1.4, which deprecated overriding the
# `event_loop_policy` fixture). Optional: without pytest-asyncio nobody calls it. Last: a
# conftest's own implementation answers first (firstresult).
@pytest.hookimpl(optionalhook=True, trylast=True)
def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {config.stash[_EVENT_LOOP].name: config.stash[_LOOP_FACTORY]}


class _Launcher(Protocol):
    def start(self) -> object: ...
    def stop(self) -> None: ...


_L = TypeVar("_L", bound=_Launcher)


def _start_or_fail(launcher: _L) -> _L:
    """Start `launcher`; turn a missing binary into a test failure, not an error or a skip."""
    try:
        launcher.start()
    except FileNotFoundError as exc:
        missing = str(exc)
    except BaseException:
        launcher.stop()
        raise
    else:
        return launcher
    launcher.stop()
    # Outside the except block, so the report shows one clean message, not a chained trace.
    pytest.fail(missing, pytrace=False)


@contextlib.contextmanager
def _running(launcher: _L) -> Iterator[_L]:
    _start_or_fail(launcher)
    try:
        yield launcher
    finally:
        launcher.stop()


class ServerLauncher:
    """Starts private servers for one test and stops them all (LIFO) when the test ends.

    Use it for chaos tests that kill, pause or restart members, which would disturb the
    session-scoped servers other tests share.
    """

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack

    def start(self, launcher: _L) -> _L:
        """Start any launcher (e.g. `RedisServer(tls=True)`) and stop it at test end."""
        return self._stack.enter_context(_running(launcher))

    def redis(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        tls: bool = False,
        appendonly: bool = False,
    ) -> RedisServer:
        """A private standalone redis-server."""
        from .servers import RedisServer

        return self.start(
            RedisServer(password=password, username=username, tls=tls, appendonly=appendonly)
        )

    def redis_sentinel(
        self, *, replicas: int = 2, sentinels: int = 3, password: str | None = None
    ) -> RedisSentinelCluster:
        """A private master + replicas + sentinels cluster."""
        from .servers import RedisSentinelCluster

        return self.start(
            RedisSentinelCluster(replicas=replicas, sentinels=sentinels, password=password)
        )

    def nats(
        self,
        *,
        jetstream: bool = True,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: bool = False,
    ) -> NatsServer:
        """A private nats-server (JetStream on by default)."""
        from .servers import NatsServer

        return self.start(
            NatsServer(jetstream=jetstream, user=user, password=password, token=token, tls=tls)
        )

    def nats_cluster(self, size: int = 3, *, jetstream: bool = True) -> NatsCluster:
        """A private routed NATS cluster (JetStream on by default)."""
        from .servers import NatsCluster

        return self.start(NatsCluster(size, jetstream=jetstream))

    def consul_agent(self) -> ConsulAgent:
        """A private `consul agent -dev`."""
        from .servers import ConsulAgent

        return self.start(ConsulAgent())

    def consul_cluster(self, size: int = 3) -> ConsulCluster:
        """A private cluster of consul servers with an elected leader."""
        from .servers import ConsulCluster

        return self.start(ConsulCluster(size))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server (no persistence, no auth) shared by the test session."""
    from .servers import RedisServer

    with _running(RedisServer()) as server:
        yield server


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelCluster]:
    """A 1 master + 2 replicas + 3 sentinels cluster shared by the test session."""
    from .servers import RedisSentinelCluster

    with _running(RedisSentinelCluster()) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A JetStream-enabled nats-server shared by the test session."""
    from .servers import NatsServer

    with _running(NatsServer(jetstream=True)) as server:
        yield server


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-node routed JetStream cluster shared by the test session."""
    from .servers import NatsCluster

    with _running(NatsCluster(3, jetstream=True)) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def consul_agent() -> Iterator[ConsulAgent]:
    """A `consul agent -dev` shared by the test session."""
    from .servers import ConsulAgent

    with _running(ConsulAgent()) as agent:
        yield agent


@pytest.fixture(scope="session")
def consul_cluster() -> Iterator[ConsulCluster]:
    """A 3-server consul cluster with an elected leader, shared by the test session."""
    from .servers import ConsulCluster

    with _running(ConsulCluster(3)) as cluster:
        yield cluster


@pytest.fixture
def netns_network() -> Iterator[Network]:
    """A private network of Linux namespaces for partition tests, removed when the test ends.

    `add(name)` makes a member (a namespace with a private address); servers go on members via
    `placement=member.placement` and `netns_network.serve(launcher)`; the test process is
    `netns_network.host`; `partition(groups)` / `heal()` cut and restore links. Needs root:
    anything else fails the test with the reason (never a skip).
    """
    from .netns import Network, NetworkError

    network = Network()
    try:
        network.start()
    except NetworkError as exc:
        reason = str(exc)
    else:
        try:
            yield network
        finally:
            network.stop()
        return
    pytest.fail(reason, pytrace=False)


@pytest.fixture
def server_launcher() -> Iterator[ServerLauncher]:
    """Factory for private server instances, all stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        yield ServerLauncher(stack)
