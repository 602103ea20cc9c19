"""The broker benchmarks run end to end on real servers (figures go to docs, not asserts)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

import loom_ha.bench.ha
from loom_ha.bench.core import BARE, BenchRow, Path, compare, compared_row, path_rows
from loom_ha.bench.ha import default_path
from loom_ha.bench.memory import memory_rows
from loom_ha.bench.nats import nats_rows
from loom_ha.bench.redis import redis_rows
from loom_ha.cli.bench import render
from loom_ha.config import create_transport
from loom_ha.ha import HATransport
from loom_ha.memory import InMemoryTransport
from loom_ha.testing.servers import NatsServer, RedisServer


def _complete(rows: list[BenchRow]) -> None:
    """Every row has both sides and its ratio range; throughput rows have CPU on both sides."""
    for row in rows:
        assert row.ours > 0 and row.baseline is not None and row.baseline > 0, row
        assert row.spread is not None and row.spread[0] <= row.ratio <= row.spread[1], row  # type: ignore[operator]
        if row.unit != "events/s":
            assert row.cpu is None and row.cpu_added is None, row
            continue
        assert row.cpu is not None and row.cpu[0] > 0 and row.cpu[1] > 0, row
        assert row.cpu_added is not None, row
        added, low, high = row.cpu_added
        assert low <= added <= high, row


def _paired(rows: list[BenchRow]) -> list[str]:
    """The headline names, after checking each is followed by its bare-backend breakdown."""
    names = [r.name for r in rows]
    headline = [n for n in names if not n.endswith(BARE)]
    assert sorted(names) == sorted(headline + [f"{n} {BARE}" for n in headline])
    return headline


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """Every (url, transport) the bench's default paths build, through the real function."""
    made: list[tuple[str, Any]] = []

    def recording(url: str, **kwargs: Any) -> Any:
        transport = create_transport(url, **kwargs)
        made.append((url, transport))
        return transport

    monkeypatch.setattr(loom_ha.bench.ha, "create_transport", recording)
    yield made


def _modes(made: list[tuple[str, Any]]) -> dict[str, set[str]]:
    """Per built URL without ``ha=false``: the headline is HATransport; bare ones are not.

    Returns the inner backend classes measured per mode, headline and bare alike.
    """
    modes: dict[str, set[str]] = {}
    for url, transport in made:
        mode = url.partition("mode=")[2].partition("&")[0]
        if "ha=false" in url:
            assert not isinstance(transport, HATransport), url
            modes.setdefault(mode, set()).add(f"bare {type(transport).__name__}")
        else:
            assert isinstance(transport, HATransport), url
            modes.setdefault(mode, set()).add(f"ha {type(transport.inner).__name__}")
    return modes


async def test_compare_alternates_sides_and_rows_take_medians() -> None:
    """Rounds alternate which side goes first; rows show medians and the ratio range."""
    order: list[str] = []

    def side(name: str, figures: list[float]) -> object:
        async def measure() -> tuple[float, ...]:
            order.append(name)
            return (figures[len([o for o in order if o == name]) - 1],)

        return measure

    results = await compare(side("ours", [1, 9, 3]), side("base", [2, 2, 4]), 3)  # type: ignore[arg-type]
    assert order == ["ours", "base", "base", "ours", "ours", "base"]
    row = compared_row("x", "u", results, "b")
    assert (row.ours, row.baseline) == (3, 2)
    assert row.spread == (0.5, 4.5)
    latency = compared_row("y", "ms", results, "b", higher_is_better=False)
    assert latency.ratio == 2 / 3 and latency.spread == (2 / 9, 2)


async def test_three_sides_rotate_and_cpu_is_the_median_of_differences() -> None:
    """With a third side each goes first once in three rounds; a row can set any side
    against the baseline, with CPU medians and the median and range of the differences."""
    order: list[str] = []
    figures = {"ours": [(10, 5), (30, 9), (20, 6)], "base": [(10, 4), (10, 4), (10, 1)]}
    figures["bare"] = [(40, 2), (40, 3), (40, 1)]

    def side(name: str) -> Any:
        async def measure() -> tuple[float, ...]:
            order.append(name)
            return figures[name][order.count(name) - 1]

        return measure

    results = await compare(side("ours"), side("base"), 3, more=[side("bare")])
    assert [order[i] for i in (0, 3, 6)] == ["ours", "base", "bare"]
    assert results[1] == ((30, 9), (10, 4), (40, 3))
    row = compared_row("t", "events/s", results, "b", cpu_figure=1)
    assert (row.ours, row.baseline, row.cpu, row.cpu_added) == (20, 10, (6, 4), (5, 1, 5))
    bare = compared_row("t", "events/s", results, "b", side=2, cpu_figure=1)
    assert (bare.ours, bare.cpu, bare.cpu_added) == (40, (2, 4), (-1, -2, 0))


async def test_path_rows_clean_up_after_each_loom_ha_run() -> None:
    """A path's cleanup runs after every run of the default path and the bare backend (not
    the baseline's), and the breakdown rows follow the headline rows."""
    log: list[str] = []

    async def cleanup() -> None:
        log.append("cleanup")

    def measure(make: Any) -> Any:
        async def run() -> tuple[float, ...]:
            log.append(make())
            return (1.0, 2.0)

        return run

    path = Path(lambda: "default", lambda: "bare", cleanup)
    rows = await path_rows(
        path, measure, measure(lambda: "base"), "b", 2, [("p50", "ms", {}), ("p99", "ms", {})]
    )
    first, second = ["default", "cleanup", "base", "bare", "cleanup"], ["base", "bare", "cleanup"]
    assert log == first + second + ["default", "cleanup"]
    assert [r.name for r in rows] == ["p50", "p99", f"p50 {BARE}", f"p99 {BARE}"]


def test_default_path_is_what_create_transport_gives_users() -> None:
    """The headline transport is create_transport's HATransport (dedup on); the breakdown
    is the same backend alone."""
    path = default_path("memory://")
    headline, bare = path.default(), path.bare()  # type: ignore[misc]
    assert isinstance(headline, HATransport) and headline.capabilities.dedup
    assert isinstance(headline.inner, InMemoryTransport)
    assert type(bare) is InMemoryTransport


def test_render_shows_cpu_per_event_under_throughput_rows() -> None:
    """A throughput row's CPU figures and what loom-ha adds are printed below it."""
    out = io.StringIO()
    row = BenchRow("t", "events/s", 9.0, 9.0, "raw", cpu=(12.5, 10.0), cpu_added=(2.5, 1.25, 3.0))
    render(Console(file=out, width=200), [row], "title")
    cpu_line = next(line for line in out.getvalue().splitlines() if "CPU per event" in line)
    assert all(text in cpu_line for text in ("12.50 µs", "10.00 µs", "+2.50 µs (+1.25..+3.00)"))


async def test_memory_rows(built: list[tuple[str, Any]]) -> None:
    """memory:// rows: the default path and its bare backend beside loom-agent's."""
    rows = await memory_rows(500, 50, rounds=2)
    assert _paired(rows) == ["memory throughput", "memory ping-pong p50", "memory ping-pong p99"]
    _complete(rows)
    assert {type(t.inner if isinstance(t, HATransport) else t) for _, t in built} == {
        InMemoryTransport
    }
    assert sum(isinstance(t, HATransport) for _, t in built) == len(built) / 2


@pytest.mark.redis
async def test_redis_rows(redis_server: RedisServer, built: list[tuple[str, Any]]) -> None:
    """Redis rows: Pub/Sub and Streams, each headline on create_transport's HATransport."""
    rows = await redis_rows(redis_server.url, 300, 30, rounds=1)
    assert len(_paired(rows)) == 6
    _complete(rows)
    assert _modes(built) == {
        "pubsub": {"ha RedisPubSubTransport", "bare RedisPubSubTransport"},
        "streams": {"ha RedisStreamsTransport", "bare RedisStreamsTransport"},
    }


@pytest.mark.nats
@pytest.mark.timeout(180)  # 20 rows of 3 sides on a loaded 2-core machine
async def test_nats_rows(nats_server: NatsServer, built: list[tuple[str, Any]]) -> None:
    """NATS rows: core and JetStream, each headline on create_transport's HATransport."""
    rows = await nats_rows([nats_server.url], 300, 30, rounds=1)
    assert len(_paired(rows)) == 10
    _complete(rows)
    assert _modes(built) == {
        "core": {"ha NatsCoreTransport", "bare NatsCoreTransport"},
        "jetstream": {"ha JetStreamTransport", "bare JetStreamTransport"},
    }
