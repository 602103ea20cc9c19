"""Waiting helpers for the Redis tests (importable because tests/redis is on sys.path)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(condition: Callable[[], object], within: float = 10.0) -> None:
    """Wait until `condition()` is true, polling: statistics() has no change notification."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling statistics() is the point
            await asyncio.sleep(0.02)
