"""Routing to more services than the registry may watch: said once, routed unrouted, no wait.

Each service a process routes to holds one Consul blocking query (one connection), bounded by
`max_watches` (32 by default; ``LOOM_HA_MAX_WATCHES`` raises it). A service over the limit used
to crash its watch task silently, so every call to it waited `first_answer` (5 s) first.
"""

from __future__ import annotations

import logging

import pytest

from loom_ha._tasks import TaskSupervisor
from loom_ha.discovery import ConsulRegistry
from loom_ha.errors import ConfigurationError
from loom_ha.memory import InMemoryTransport
from loom_ha.routing.config import balanced_from_env
from loom_ha.routing.directory import InstanceDirectory
from loom_ha.routing.transport import BalancedTransport
from loom_ha.testing.consul_servers import ConsulAgent


@pytest.mark.consul
async def test_a_service_over_max_watches_is_answered_at_once_and_named_once(
    consul_agent: ConsulAgent, caplog: pytest.LogCaptureFixture
) -> None:
    """With room for one watch, the second service gets an answer (no instance) as soon as
    its watch is refused, instead of after `first_answer`; the error names the limit once."""
    tasks = TaskSupervisor("test")
    async with ConsulRegistry(f"consul://{consul_agent.address}", max_watches=1) as registry:
        directory = InstanceDirectory(registry, tasks, first_answer=3600)  # a wait would hang
        try:
            assert await directory.instances("first") == ()
            with caplog.at_level(logging.ERROR, logger="loom_ha.routing"):
                assert await directory.instances("second") == ()
                assert await directory.instances("second") == ()
            assert directory.cached("second") == ()
        finally:
            await tasks.aclose()
    refusals = [r for r in caplog.records if "cannot route to second" in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert "max_watches=1" in refusals[0].getMessage()


def test_max_watches_comes_from_the_environment() -> None:
    """LOOM_HA_MAX_WATCHES reaches the Consul registry; a bad value or another registry
    fails at once, naming the variable."""
    env = {"LOOM_HA_REGISTRY": "consul://127.0.0.1:8500", "LOOM_HA_MAX_WATCHES": "64"}
    balanced = balanced_from_env(InMemoryTransport(), env)
    assert isinstance(balanced, BalancedTransport)
    assert isinstance(balanced.registry, ConsulRegistry)
    assert balanced.registry.max_watches == 64
    for bad in ("many", "0"):
        with pytest.raises(ConfigurationError, match="LOOM_HA_MAX_WATCHES"):
            balanced_from_env(InMemoryTransport(), {**env, "LOOM_HA_MAX_WATCHES": bad})
    with pytest.raises(ConfigurationError, match="consul:// registries only"):
        balanced_from_env(
            InMemoryTransport(),
            {"LOOM_HA_REGISTRY": "memory://", "LOOM_HA_MAX_WATCHES": "64"},
        )
