"""The documentation site's promises: the front page's URLs work, the API reference is whole.

`mkdocs build --strict` (a step of scripts/test) checks links, anchors and the nav; these
tests check what it cannot: that the URLs the front page recommends are accepted as written,
and that no public module is missing from the reference.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import re

import pytest

import loom_ha
from loom_ha.config import create_transport
from loom_ha.discovery import open_registry
from loom_ha.spec import parse_transport_url

from ._dist import ROOT

DOCS = ROOT / "docs"
NO_API = {"cli", "bench"}  # tooling: documented by `loom-ha --help`, not the reference
MODE_WORDS = {
    "memory": "in-process",
    "streams": "Streams",
    "pubsub": "Pub/Sub",
    "jetstream": "JetStream",
    "core": "core NATS",
}


def _url_table() -> list[list[str]]:
    """The rows of the front page's "Which URL do I use" table, cells stripped."""
    text = (DOCS / "index.md").read_text()
    section = text.split("## Which URL do I use", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def _code(cell: str) -> str:
    (value,) = re.findall(r"`([^`]+)`", cell)
    return value


ROWS = _url_table()


def test_front_page_table_has_every_broker() -> None:
    """The table covers memory, Redis, Sentinel, NATS and both registries."""
    urls = [_code(row[1]) for row in ROWS]
    for scheme in ("memory", "redis", "rediss", "redis+sentinel", "nats", "tls", "consul"):
        assert any(u.startswith(f"{scheme}://") for u in urls), scheme


@pytest.mark.parametrize("row", ROWS, ids=[_code(row[1]) for row in ROWS])
def test_front_page_url_is_accepted_as_written(row: list[str]) -> None:
    """Each URL builds (nothing connects): a transport, or a registry where the row says
    ``LOOM_HA_REGISTRY``; the extra and the delivery mode the row names are the URL's."""
    who, url_cell, what, extra = row
    url = _code(url_cell)
    if "LOOM_HA_REGISTRY" in who:
        registry = open_registry(url)
        assert extra == f"`{registry.backend}`"
        return
    spec = parse_transport_url(url)
    transport = create_transport(url)
    assert type(transport).__name__ == "HATransport"
    assert extra == ("—" if spec.broker == "memory" else f"`{spec.broker}`")
    assert MODE_WORDS[spec.mode] in what


def test_api_reference_covers_every_public_module() -> None:
    """Every public module or package of loom_ha has a `::: loom_ha...` directive in
    docs/reference/, and every directive names a module that exists."""
    directives = {
        match
        for page in (DOCS / "reference").glob("*.md")
        for match in re.findall(r"^::: (\S+)$", page.read_text(), flags=re.MULTILINE)
    }
    public = {
        f"loom_ha.{m.name}"
        for m in pkgutil.iter_modules(loom_ha.__path__)
        if not m.name.startswith("_") and m.name not in NO_API
    }
    missing = {m for m in public if not any(d == m or d.startswith(f"{m}.") for d in directives)}
    assert missing == set(), "add them to a page under docs/reference/"
    for directive in directives:
        assert importlib.util.find_spec(directive) is not None, directive
