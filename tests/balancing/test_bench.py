"""The decision benchmark measures every strategy, bare and in the Ejector (figures go to
docs/benchmarks.md, not asserts)."""

from __future__ import annotations

import pytest

from loom_ha.bench.balancing import STRATEGY_NAMES, WRAPPINGS, decision_rows, main


def test_every_strategy_and_wrapping_gets_a_row() -> None:
    """One positive figure per strategy, wrapping and size."""
    rows = decision_rows(sizes=(10,))
    assert [r.name for r in rows] == [
        f"decision {name} {wrapping}, 10 instances"
        for name in STRATEGY_NAMES
        for wrapping in WRAPPINGS
    ]
    assert all(r.ours > 0 for r in rows)


def test_the_command_prints_a_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m loom_ha.bench.balancing --sizes 10`` prints one line per cell row."""
    assert main(["--sizes", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(STRATEGY_NAMES) * len(WRAPPINGS)
    assert all(name in "\n".join(lines) for name in STRATEGY_NAMES)
