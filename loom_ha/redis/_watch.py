"""MasterWatch: notices that the master of a connector is gone, even when nothing errors.

A liveness probe asks the master every `probe_interval` (``ROLE`` with Sentinel, ``PING``
otherwise) on its own connection, so a master that stops answering without closing its
sockets (a paused process, a frozen VM, dropped packets) is reported lost at most
`socket_timeout` after its last answer, whether or not anyone is sending commands. With
Sentinel it also reports a master that says it is a replica now, one that ``+switch-master``
moved away from, and one the sentinels' newest configuration no longer names (a switch
missed while no sentinel was followed, or an old master that came back still believing it
is master).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection

from loom_ha.errors import ConnectionLostError, LoomHAError
from loom_ha.redis._connections import Address, checkpoint, text
from loom_ha.redis._errors import map_redis_errors
from loom_ha.redis._sentinel import Sentinels
from loom_ha.retry import RetryPolicy, within

log = logging.getLogger("loom_ha.redis")

MOVE_POLICY = within(10.0)
"""Following a ``+switch-master``: the named master should answer at once."""

SENTINEL_CHECK_EVERY = 4
"""With Sentinel, every this many probes the sentinels are asked which master they name."""


class Watched(Protocol):
    """What a `MasterWatch` needs of its connector (`RedisConnector` provides it)."""

    generation: int
    reconnect_policy: RetryPolicy

    @property
    def address(self) -> Address | None: ...
    @property
    def endpoint(self) -> str | None: ...
    async def client(self) -> Any: ...
    async def dedicated(self) -> tuple[AbstractConnection, int]: ...
    async def release(self, conn: AbstractConnection) -> None: ...
    async def lost(self, generation: int, reason: object = "", *, silent: bool = False) -> None: ...


class MasterWatch:
    """Reports a gone master to its connector; see the module docstring.

    Args:
        connector: what is watched.
        sentinels: the sentinels (None in direct mode).
        socket_timeout: the longest a master may stay silent.
        probe_interval: seconds between probes (below `socket_timeout`).
        owner: name used in logs.
    """

    def __init__(
        self,
        connector: Watched,
        sentinels: Sentinels | None,
        *,
        socket_timeout: float,
        probe_interval: float,
        owner: str,
    ) -> None:
        self._connector = connector
        self._sentinels = sentinels
        self._limit = socket_timeout
        self._interval = probe_interval
        self._owner = owner

    async def probe_forever(self) -> None:
        """Keep a probe on the current master for as long as the connector runs."""
        connector = self._connector
        while True:
            checkpoint()
            conn, generation = await connector.reconnect_policy.call(connector.dedicated)
            try:
                await self._probe(conn, generation)
            except (ConnectionLostError, OSError) as exc:  # its connection broke: a new one
                log.debug("%s: liveness probe: %s", self._owner, exc)
            except LoomHAError as exc:  # refused (an ACL?): try again later, not in a loop
                log.warning("%s: liveness probe refused: %s", self._owner, exc)
                await asyncio.sleep(self._interval)
            finally:
                await connector.release(conn)

    async def _probe(self, conn: AbstractConnection, generation: int) -> None:
        """Ask the master every `probe_interval`; return once it was reported lost."""
        # Sent `probe_interval` after the last answer, a probe may wait the rest of
        # `socket_timeout`: a silent master is lost at most that long after it last answered.
        wait = self._limit - self._interval
        command = "ROLE" if self._sentinels is not None else "PING"
        rounds = 0
        while True:
            with map_redis_errors(f"redis {command} probe"):
                await conn.send_command(command, check_health=False)
                # Not closed here on an error or a cancel (redis-py would close it without
                # waiting, leaving a TLS shutdown behind): `release()` closes it and waits.
                reply = await conn.read_response(timeout=wait, disconnect_on_error=False)
            checkpoint()
            if reply is None:
                reason = f"no answer for {self._limit}s"
                await self._connector.lost(generation, reason, silent=True)
                return
            if self._sentinels is not None:
                role = text(reply[0])
                if role != "master":
                    reason = f"{self._connector.endpoint} is now a {role}"
                    await self._connector.lost(generation, reason)
                    return
                rounds += 1
                if rounds % SENTINEL_CHECK_EVERY == 0 and await self.moved_away():
                    return
            await asyncio.sleep(self._interval)

    async def moved_away(self) -> bool:
        """Report the master lost if the sentinels' newest configuration names another node.

        True if so. Catches a switch missed while no sentinel was followed, and an old
        master that came back still believing it is master (split-brain).
        """
        assert self._sentinels is not None
        generation, current = self._connector.generation, self._connector.address
        best = (await self._sentinels.ask()).best()
        if current is None or best is None or best == current:
            return False
        await self._connector.lost(generation, f"the sentinels name {best[0]}:{best[1]}")
        return True

    async def sentinels_asked(self) -> None:
        """After (re)subscribing to a sentinel: a switch may have been missed meanwhile."""
        try:
            await self.moved_away()
        except LoomHAError as exc:
            log.debug("%s: asking the sentinels: %s", self._owner, exc)

    async def switched(self, address: Address) -> None:
        """``+switch-master``: leave the current master for the one named, now.

        Finding it here (rather than when the next reader retries) ends the backoff of
        every reader at once: they wake as soon as a master is established.
        """
        connector = self._connector
        generation = connector.generation
        if connector.address == address:
            return
        await connector.lost(generation, f"+switch-master to {address[0]}:{address[1]}")
        try:
            await MOVE_POLICY.call(connector.client)
        except LoomHAError as exc:  # the probe keeps trying
            log.warning("%s: new master not reachable yet: %s", self._owner, exc)
