"""Helpers shared by the Redis backend tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from loom_ha.testing.servers import RedisServer


@pytest.fixture
def tag() -> str:
    """A unique topic prefix so tests never see each other's events."""
    return f"t{uuid.uuid4().hex[:10]}/"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the session server, for injecting and inspecting data."""
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    try:
        yield client
    finally:
        await client.aclose()
