"""The soak benchmark runs end to end: its report's shape and counts (figures go to docs)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from loom_ha.bench.soak import ROW_NAMES, SoakReport, render_soak, soak, window_sizes
from loom_ha.cli import main
from loom_ha.cli.bench import run_soak


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, color_system=None), out


def _check_windows(report: SoakReport, calls: int) -> None:
    assert report.calls == calls
    assert len(report.windows) == min(calls, 100)
    assert sum(w.calls for w in report.windows) == calls
    assert all(w.seconds > 0 and w.rss > 0 for w in report.windows)
    assert report.first_runs_per_second > 0 and report.last_runs_per_second > 0
    assert report.rss_start > 0 and report.first_rss > 0 and report.last_rss > 0


def test_window_sizes_cover_every_call() -> None:
    """Calls are cut into up to 100 windows of nearly equal size that add up to all calls."""
    assert window_sizes(300) == [3] * 100
    assert window_sizes(50) == [1] * 50
    sizes = window_sizes(1_234)
    assert len(sizes) == 100 and sum(sizes) == 1_234 and set(sizes) == {12, 13}
    with pytest.raises(ValueError, match="calls must be >= 1, got 0"):
        window_sizes(0)


async def test_soak_over_memory_leaves_no_handler_behind() -> None:
    """300 HALoomApp calls: every call in a window, the handler and subscription counts end
    where they started, one request and one reply per call; upstream LoomApp's 200 calls
    leave a handler each, and each reply goes to every handler so far (what the soak shows)."""
    ours = await soak("memory://", 300)
    _check_windows(ours, 300)
    assert (ours.app, ours.backend, ours.store) == ("HALoomApp", "ha(memory)", "last 1,000")
    assert ours.handlers[0] == ours.handlers[1] > 0
    assert ours.subscriptions[0] == ours.subscriptions[1] > 0
    assert ours.published == ours.delivered == 2 * 300

    upstream = await soak("memory://", 200, upstream=True, keep_events=True)
    _check_windows(upstream, 200)
    assert upstream.app == "LoomApp (upstream)"
    assert upstream.store == "Loom InMemoryEventStore (all)"
    assert upstream.handlers[1] - upstream.handlers[0] == 200
    assert upstream.published == 2 * 200
    # 200 requests, and reply k reaches the k handlers subscribed by then.
    assert upstream.delivered == 200 + sum(range(1, 201))

    console, out = _console()
    render_soak(console, [ours, upstream], "soak")
    text = out.getvalue()
    for name in ROW_NAMES:
        assert name in text, name
    assert "2 -> 2" in text and "600 / 600" in text and "-> 202" in text


def test_soak_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`loom-ha bench --soak` prints both columns, and rejects a transport it cannot soak."""
    assert main(["bench", "--soak", "--calls", "120", "--upstream", "30"]) == 0
    shown = capsys.readouterr().out
    assert "HALoomApp" in shown and "LoomApp (upstream)" in shown and "120" in shown
    assert main(["bench", "--soak", "--transport", "all"]) == 2
    assert "--soak runs on one transport" in capsys.readouterr().out
    assert main(["bench", "--soak", "--calls", "0"]) == 2
    assert "--calls must be >= 1" in capsys.readouterr().out


@pytest.mark.nats
async def test_soak_starts_its_own_broker() -> None:
    """Without --url the soak starts a NATS server, runs on the asked mode, and stops it."""
    console, out = _console()
    code = await run_soak(console, transport="nats", calls=100, upstream=0, mode="core")
    assert code == 0
    text = out.getvalue()
    assert "ha(nats-core)" in text and "LoomApp (upstream)" not in text
