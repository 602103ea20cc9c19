"""What a headline row measures: the transport `create_transport(url)` gives users.

That is `HATransport` with its default in-process dedup window around the backend (what
`loom_transport()` gives every LoomApp); the breakdown is the same URL with ``ha=false``,
the backend alone, built by the same function with every other option equal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from loom_ha.bench.core import Path
from loom_ha.config import create_transport


def with_options(url: str, **options: str) -> str:
    """`url` with query options added (later options win, so these override the URL's)."""
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return url + ("&" if "?" in url else "?") + query if query else url


def default_path(
    url: str,
    *,
    event_class: Any = None,
    cleanup: Callable[[], Awaitable[None]] | None = None,
) -> Path:
    """The default path of `url` (HA and dedup at their defaults) and its bare backend.

    Args:
        url: a transport URL with the options that pick the mode (``mode=core``).
        event_class: the class received events are built as (the codec's target).
        cleanup: run after each measurement of either (see `Path`).
    """
    bare_url = with_options(url, ha="false")

    def default() -> Any:
        return create_transport(url, event_class=event_class)

    def bare() -> Any:
        return create_transport(bare_url, event_class=event_class)

    return Path(default, bare, cleanup)
