"""RedisDedup: a dedup window shared through Redis, on the backend's own connector.

The window runs on a `RedisConnector`, as the transports do, so a ``redis+sentinel://`` URL
works and every command follows the master through a failover instead of staying on a
demoted or dead one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from loom_ha._tasks import TaskSupervisor
from loom_ha.errors import ConfigurationError, LoomHAError, TransportClosedError
from loom_ha.redis.connection import RedisConnector
from loom_ha.redis.url import settings_from
from loom_ha.retry import within

__all__ = ["RedisDedup"]

T = TypeVar("T")
log = logging.getLogger("loom_ha.redis.dedup")

CONNECT_TIMEOUT = 10.0
"""Seconds the first use waits for a master (the transports' default `connect_timeout`)."""
COMMAND_POLICY = within(30.0)
"""claim / complete / release while the master is away: the transports' publish policy."""
_DONE = b"done"


class RedisDedup:
    """A `DedupWindow` shared through Redis by every instance of a service.

    ``SET key token NX PX lease`` claims; while the handler runs one task per window renews
    every held lease every ``lease / 3`` seconds in one pipelined round trip; `complete`
    writes the key for `ttl`; `release` deletes it. A claim of a process that died lapses
    after `lease` seconds, so a redelivery (or a retry on another instance) is handled.

    Args:
        url: ``redis://``, ``rediss://`` or ``redis+sentinel://`` (see `parse_redis_url`).
        ttl: how long a completed event is remembered, seconds.
        lease: how long a claim outlives its instance (default: 10 s, or the ttl if shorter).
        prefix: prepended to every key this window writes.

    The connection is opened on first use (or by `start()`); while the master is away a
    call retries for up to 30 s, following a Sentinel failover. `close()` is terminal.

    Raises:
        ConfigurationError: a bad URL, or not ``0 < lease <= ttl``.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 600.0,
        lease: float | None = None,
        prefix: str = "loom:dedup:",
    ) -> None:
        lease = min(10.0, ttl) if lease is None else lease
        if ttl <= 0 or lease <= 0 or lease > ttl:
            raise ConfigurationError(
                f"dedup needs ttl > 0 and 0 < lease <= ttl, got ttl={ttl}, lease={lease}"
            )
        self.settings = settings_from(url)
        self.ttl = ttl
        self.lease = lease
        self.prefix = prefix
        # A renewal round gives up before the next one is due.
        self._renew_policy = within(lease / 3)
        self._held: set[str] = set()
        self._connector: RedisConnector | None = None
        self._starting = asyncio.Lock()
        self._closed = False
        self._tasks = TaskSupervisor("redis-dedup")
        self._renewer: asyncio.Task[None] | None = None

    # -- DedupWindow ---------------------------------------------------------------------

    async def claim(self, key: str) -> bool:
        """True if this window now holds `key`'s lease (the caller runs the handler).

        Safe to retry across a failover: the claim stores a token of its own, so an
        attempt whose reply was lost is recognised as ours rather than as a duplicate.

        Raises:
            ConnectionLostError: no master reachable when the window first connected.
            FailoverExhaustedError: no master answered within 30 s.
            TransportClosedError: the window was closed.
        """
        name, token, lease_ms = self.prefix + key, uuid.uuid4().bytes, int(self.lease * 1000)

        async def claim(client: Any) -> bool:
            if await client.set(name, token, nx=True, px=lease_ms):
                return True
            # Present: someone else's, or ours from an attempt whose reply was lost.
            return bool((await client.get(name)) == token)

        if not await self._run(claim, "claim"):
            return False
        self._held.add(key)
        if not self._closed and (self._renewer is None or self._renewer.done()):
            self._renewer = self._tasks.spawn(self._renew_leases(), name="renew-leases")
        return True

    async def complete(self, key: str) -> None:
        """Remember `key` as handled for `ttl` (written even if a failover lost the claim)."""
        self._held.discard(key)
        name, ttl_ms = self.prefix + key, int(self.ttl * 1000)

        async def complete(client: Any) -> Any:
            return await client.set(name, _DONE, px=ttl_ms)

        await self._run(complete, "complete")

    async def release(self, key: str) -> None:
        """Delete `key` so a redelivery is handled at once."""
        self._held.discard(key)
        name = self.prefix + key

        async def release(client: Any) -> Any:
            return await client.delete(name)

        await self._run(release, "release")

    async def start(self) -> None:
        """Find the master and start following it; idempotent, called by the first use.

        Raises:
            ConnectionLostError: no master reachable within 10 s (transient).
            TransportClosedError: the window was closed.
        """
        if self._connector is not None:
            return
        async with self._starting:
            if self._closed:
                raise TransportClosedError("redis dedup: the window was closed")
            if self._connector is not None:
                return
            connector = RedisConnector(self.settings, owner="loom_ha.redis.dedup")
            try:
                await connector.start(timeout=CONNECT_TIMEOUT)
            except BaseException:
                await connector.close()
                raise
            if self._closed:  # close() ran while we connected
                await connector.close()
                raise TransportClosedError("redis dedup: the window was closed")
            self._connector = connector

    async def close(self) -> None:
        """Stop renewing and close every connection; idempotent. Held leases lapse.

        The window stays usable: its next use connects again (an `HATransport` closes
        its window on `disconnect()` and may be connected again).
        """
        self._closed = True  # a start() under way gives its connection up
        try:
            await self._tasks.aclose()
        finally:  # even if cancelled meanwhile: never leave the connection behind
            self._held.clear()
            connector, self._connector = self._connector, None
            try:
                if connector is not None:
                    await connector.close()
            finally:
                self._closed = False
                self._tasks.reopen()

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, operation: Callable[[Any], Awaitable[T]], verb: str) -> T:
        connector = self._connector
        if connector is None:
            await self.start()
            connector = self._connector
            if connector is None:  # closed right after starting
                raise TransportClosedError("redis dedup: the window was closed")
        return await connector.run(operation, policy=COMMAND_POLICY, what=f"redis dedup: {verb}")

    async def _renew_leases(self) -> None:
        """Keep the leases of running handlers alive (one pipelined round trip per round)."""
        lease_ms = int(self.lease * 1000)
        while True:
            await asyncio.sleep(self.lease / 3)
            connector, held = self._connector, list(self._held)
            if connector is None or not held:
                continue

            async def renew(client: Any, held: list[str] = held) -> Any:
                async with client.pipeline(transaction=False) as pipe:
                    for key in held:
                        # GT: never shorten a key `complete` just extended to the ttl.
                        pipe.pexpire(self.prefix + key, lease_ms, gt=True)
                    return await pipe.execute()

            try:
                await connector.run(renew, policy=self._renew_policy, what="redis dedup: renew")
            except LoomHAError as exc:  # Redis away: the next round tries again
                log.warning("redis dedup: could not renew %d leases: %s", len(held), exc)
