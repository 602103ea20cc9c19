"""Generated documentation stays in step with the code."""

from __future__ import annotations

from pathlib import Path

from loom_ha.cli.docsgen import render

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_delivery_matrix_matches_declared_capabilities() -> None:
    """docs/delivery-guarantees.md is what the declared capabilities generate."""
    committed = (DOCS / "delivery-guarantees.md").read_text()
    assert committed == render(), "run: python -m loom_ha.cli.docsgen > docs/delivery-guarantees.md"
