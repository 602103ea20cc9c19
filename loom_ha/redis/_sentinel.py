"""The sentinels of one connector: which master they name, and their ``+switch-master`` news.

Asking is bounded: every sentinel is asked at once, each answer within `socket_timeout`,
and once most of them answered the rest get `ANSWER_GRACE` more. A frozen or dead
sentinel therefore costs next to nothing while the others answer (asked one after the
other, a frozen first sentinel would delay every master lookup by its whole timeout).
Answers are ranked by Sentinel's config epoch, which a failover raises: right after one,
the sentinel that ran it names the new master while the others still name the old one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from loom_ha.errors import ConnectionLostError, LoomHAError
from loom_ha.redis._connections import Address, ConnectionFactory, checkpoint, connect, text
from loom_ha.redis._errors import map_redis_errors
from loom_ha.redis.url import RedisSettings

log = logging.getLogger("loom_ha.redis")

SWITCH_CHANNEL = "+switch-master"
ROUND_PAUSE = 0.2
"""Seconds between two rounds over the sentinels when every one of them failed."""
ANSWER_GRACE = 0.1
"""Seconds the remaining sentinels get once most of them answered (a live one answers in
milliseconds; a frozen one never)."""


@dataclass
class Named:
    """What the sentinels answered: each master address, how many named it, at what epoch."""

    votes: dict[Address, int] = field(default_factory=dict)  # in the order first named
    epochs: dict[Address, int] = field(default_factory=dict)  # the highest config epoch seen
    errors: list[str] = field(default_factory=list)

    def add(self, address: Address, epoch: int) -> None:
        """One sentinel named `address` with config epoch `epoch`."""
        self.votes[address] = self.votes.get(address, 0) + 1
        self.epochs[address] = max(epoch, self.epochs.get(address, epoch))

    def ranked(self, suspect: Address | None = None) -> list[Address]:
        """Best first: the newest configuration (highest epoch), then not `suspect` (a master
        given up for its silence), then the most sentinels; first named among equals."""
        votes, epochs = self.votes, self.epochs
        return sorted(votes, key=lambda a: (-epochs[a], a == suspect, -votes[a]))

    def best(self) -> Address | None:
        """The master of the newest configuration the sentinels answered with, if any."""
        ranked = self.ranked()
        return ranked[0] if ranked else None


def _address(host: object, port: object) -> Address:
    return (text(host), int(text(port)))


def _epoch(reply: Any) -> int:
    """The ``config-epoch`` field of a RESP2 ``SENTINEL MASTER`` reply (0 if absent)."""
    fields = [text(item) for item in reply or ()]
    state = dict(zip(fields[::2], fields[1::2], strict=False))
    return int(state.get("config-epoch", 0))


class Sentinels:
    """Asks the configured sentinels about one master and follows their switch messages."""

    def __init__(self, settings: RedisSettings, factory: ConnectionFactory, *, owner: str) -> None:
        assert settings.master_name is not None
        self.settings = settings
        self.master_name = settings.master_name
        self._factory = factory
        self._owner = owner
        self._clients: list[aioredis.Redis] = []
        self._news = asyncio.Event()

    @property
    def news(self) -> asyncio.Event:
        """Set by the next ``+switch-master`` (a new event is handed out after each one)."""
        return self._news

    def open(self) -> None:
        """Create the command clients (connected on first use)."""
        self._clients = [
            self._factory.client(address, sentinel=True) for address in self.settings.addresses
        ]

    async def close(self) -> None:
        """Close every command client."""
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose(close_connection_pool=True)

    async def ask(self) -> Named:
        """Which master the sentinels name, and at which config epoch; see the module docstring.

        Raises:
            ConnectionLostError: the sentinel clients are closed.
            TransportError: a sentinel refused our credentials (not retried).
        """
        if not self._clients:
            raise ConnectionLostError("the sentinel clients are closed")
        named = Named()
        refused: list[LoomHAError] = []
        name = self.master_name

        async def one(client: aioredis.Redis, address: Address) -> None:
            try:
                with map_redis_errors(f"sentinel {address[0]}:{address[1]}"):
                    async with client.pipeline(transaction=False) as pipe:
                        pipe.execute_command("SENTINEL", "get-master-addr-by-name", name)
                        pipe.execute_command("SENTINEL", "MASTER", name)
                        master, state = await pipe.execute(raise_on_error=False)
            except ConnectionLostError as exc:
                named.errors.append(str(exc))
                return
            except LoomHAError as exc:
                refused.append(exc)
                return
            if not master or isinstance(master, Exception):
                named.errors.append(f"sentinel {address}: no master named {name!r}: {master}")
                return
            epoch = 0 if isinstance(state, Exception) else _epoch(state)
            named.add(_address(master[0], master[1]), epoch)

        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            pending = {
                group.create_task(one(client, address))
                for client, address in zip(self._clients, self.settings.addresses, strict=True)
            }
            total, deadline = len(pending), None
            while pending and not refused:
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break  # the grace is over: the silent ones are left out
                if deadline is None and (total - len(pending)) * 2 > total:
                    deadline = loop.time() + ANSWER_GRACE
            for task in pending:
                task.cancel()
        if refused:
            raise refused[0]
        return named

    async def follow(
        self,
        on_switch: Callable[[Address], Awaitable[None]],
        on_subscribed: Callable[[], Awaitable[None]],
    ) -> None:
        """Listen to ``+switch-master`` on one sentinel at a time, forever.

        A sentinel that stays silent for `socket_timeout` (no message, no PONG) is left
        for the next one. `on_subscribed` runs after each (re)subscription, since a switch
        may have happened while no sentinel was followed.
        """
        while True:
            for address in self.settings.addresses:
                checkpoint()
                try:
                    await self._follow(address, on_switch, on_subscribed)
                except (ConnectionLostError, OSError) as exc:
                    log.debug("%s: sentinel %s: %s", self._owner, address, exc)
            await asyncio.sleep(ROUND_PAUSE)  # every sentinel failed: back off a little

    async def _follow(
        self,
        address: Address,
        on_switch: Callable[[Address], Awaitable[None]],
        on_subscribed: Callable[[], Awaitable[None]],
    ) -> None:
        conn = self._factory.connection(address, sentinel=True)
        # Idle for half the timeout: PING; the PONG must come within the other half.
        interval = self.settings.socket_timeout / 2
        try:
            with map_redis_errors(f"sentinel {address[0]}:{address[1]}"):
                await connect(conn)
                await conn.send_command("SUBSCRIBE", SWITCH_CHANNEL)
                await conn.read_response()
                await on_subscribed()
                ping_sent = False
                while True:
                    reply = await conn.read_response(timeout=interval)
                    checkpoint()
                    if reply is None:
                        if ping_sent:
                            raise ConnectionLostError(
                                f"sentinel {address[0]}:{address[1]} did not answer PING"
                            )
                        await conn.send_command("PING")
                        ping_sent = True
                        continue
                    ping_sent = False
                    if text(reply[0]) == "message":
                        parts = text(reply[2]).split()
                        if len(parts) == 5 and parts[0] == self.master_name:
                            log.warning("%s: %s %s", self._owner, SWITCH_CHANNEL, parts)
                            news, self._news = self._news, asyncio.Event()
                            news.set()
                            await on_switch(_address(parts[3], parts[4]))
        finally:
            await conn.disconnect(nowait=True)
