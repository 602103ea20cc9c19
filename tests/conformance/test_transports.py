"""Runs the shipped conformance suite against every transport backend."""

from __future__ import annotations

import pytest

from loom_ha.ha import HATransport
from loom_ha.memory import InMemoryTransport
from loom_ha.testing.conformance import Backend, TransportConformance

BACKENDS = [
    "memory",
    "ha-memory",
]


@pytest.fixture
def backend_memory() -> Backend:
    """The embedded default: one shared in-process transport."""
    return Backend("memory", InMemoryTransport, InMemoryTransport.capabilities)


@pytest.fixture
def backend_ha_memory() -> Backend:
    """HATransport over the embedded default: the HA layer must not change semantics."""
    return Backend(
        "ha-memory",
        lambda: HATransport(InMemoryTransport()),
        HATransport(InMemoryTransport()).capabilities,
    )


class TestTransportConformance(TransportConformance):
    """Every backend in BACKENDS passes the same suite."""

    @pytest.fixture(params=BACKENDS)
    def backend(self, request: pytest.FixtureRequest) -> Backend:
        """The backend under test, by name."""
        backend: Backend = request.getfixturevalue(f"backend_{request.param.replace('-', '_')}")
        return backend
