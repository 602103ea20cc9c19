"""`python -m loom_ha.bench.path_profile`: every piece is measured (structure, not speed)."""

from __future__ import annotations

from typing import Any

import pytest

from loom_ha.bench.path_profile import CORE_OVER, nats_core_pieces, report, streams_drain


async def test_every_piece_of_the_nats_core_path_is_measured() -> None:
    pieces = await nats_core_pieces(events=200, rounds=2)
    assert set(CORE_OVER) | set(CORE_OVER.values()) == set(pieces)
    assert all(len(values) == 2 and min(values) > 0 for values in pieces.values())
    text = report("core", "ns", pieces, CORE_OVER)
    assert all(name in text for name in pieces)


@pytest.mark.redis
async def test_the_streams_drain_reads_every_entry_on_each_path(redis_server: Any) -> None:
    # Each drain returns only once its handler saw every entry of the backlog.
    pieces = await streams_drain(redis_server.url, events=300, rounds=1)
    assert list(pieces) == ["raw redis-py", "bare backend", "default path"]
    assert all(len(values) == 1 and values[0] > 0 for values in pieces.values())
