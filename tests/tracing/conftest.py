"""An SDK tracer provider with an in-memory exporter, given to loom-ha for one test.

`use_tracer_provider` rather than OpenTelemetry's global provider, which can be set only once
per process: tests after this one run with tracing off again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loom_ha.tracing import use_tracer_provider

from ._spans import Spans


@pytest.fixture
def spans() -> Iterator[Spans]:
    """loom-ha traces into an in-memory exporter for this test."""
    recorder = Spans("client")
    use_tracer_provider(recorder.provider)
    try:
        yield recorder
    finally:
        use_tracer_provider(None)
        recorder.provider.shutdown()
