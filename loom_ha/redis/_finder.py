"""MasterFinder: which node is the master now, verified by the node itself.

Direct mode has one server. With Sentinel the candidates are the nodes the sentinels
name, best first: the newest configuration (a failover raises its epoch), then not the
master last lost for its silence, then named by the most sentinels. A candidate is only
used once ``ROLE`` says ``master`` (redis-py #903: sentinels may still name the dead node
during an election).
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from loom_ha.errors import ConnectionLostError, LoomHAError
from loom_ha.redis._connections import Address, ConnectionFactory, execute, text
from loom_ha.redis._errors import map_redis_errors
from loom_ha.redis._sentinel import Sentinels
from loom_ha.redis.url import RedisSettings

Check = asyncio.Task["aioredis.Redis | LoomHAError"]

REASK_INTERVAL = 0.2
"""Seconds between two questions to the sentinels while a candidate is being checked: a
replica promoted meanwhile is used within about this long of being named."""


class MasterFinder:
    """Finds and verifies the master; see the module docstring.

    Args:
        settings: where to look; every check is bounded by `settings.socket_timeout`.
        factory: builds the clients of the candidates.
        sentinels: the sentinels to ask (None in direct mode).
        reask_interval: seconds between two questions to the sentinels while a check is
            pending (a few cheap commands, only while the master is being looked for).
    """

    def __init__(
        self,
        settings: RedisSettings,
        factory: ConnectionFactory,
        sentinels: Sentinels | None,
        *,
        reask_interval: float = REASK_INTERVAL,
    ) -> None:
        self.settings = settings
        self._factory = factory
        self._sentinels = sentinels
        self._reask_interval = reask_interval

    async def find(self, suspect: Address | None = None) -> tuple[Address, aioredis.Redis]:
        """The best-ranked candidate that answers as master, and a client of it.

        Candidates are checked at once, each for up to `socket_timeout`. While a check is
        pending the sentinels are asked again every `reask_interval` (at once after a
        ``+switch-master``), and a node they newly name is checked too: a frozen master
        (connect works, replies never come) does not hold up the replica promoted
        meanwhile. A candidate is taken once every better-ranked one failed; `suspect` (a
        master lost for its silence) ranks last.

        Raises:
            ConnectionLostError: no candidate answered as master (retry later).
            TransportError: a node or sentinel refused our credentials (not retried).
        """
        checks: dict[Address, Check] = {}
        found: tuple[Address, aioredis.Redis] | None = None
        fatal: LoomHAError | None = None
        errors: list[str] = []
        ended = False
        try:
            async with asyncio.TaskGroup() as group:
                ask, ranked = True, []
                while True:
                    news = self._sentinels.news if self._sentinels is not None else None
                    if ask:
                        try:
                            ranked = await self._ranked(checks, errors, suspect)
                        except LoomHAError as exc:  # a sentinel refused us: not retried
                            fatal = exc
                            break
                        for address in ranked:
                            if address not in checks:
                                checks[address] = group.create_task(self._verify(address))
                    found, fatal = _best(ranked, checks)
                    pending = [task for task in checks.values() if not task.done()]
                    if found is not None or fatal is not None or not pending:
                        break
                    # Until a check ends, a sentinel announces a switch, or it is time to ask.
                    announced = group.create_task(news.wait()) if news is not None else None
                    done, _ = await asyncio.wait(
                        [*pending, *([announced] if announced else [])],
                        timeout=self._reask_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    ask = not done or announced in done  # not for a check that just ended
                    if announced is not None:
                        announced.cancel()
                for task in checks.values():
                    task.cancel()  # no-op for finished ones
            ended = True
        finally:  # every client but the chosen one is closed, all of them when cancelled
            keep = found[1] if found is not None and ended else None
            for task in checks.values():
                if task.cancelled() or task.exception() is not None:
                    continue
                result = task.result()
                if isinstance(result, LoomHAError):
                    errors.append(str(result))
                elif result is not keep:
                    await result.aclose(close_connection_pool=True)
        if fatal is not None:
            raise fatal
        if found is None:
            reasons = "; ".join(errors) or "none named"
            raise ConnectionLostError(f"no usable redis master: {reasons}")
        return found

    async def _ranked(
        self, checks: dict[Address, Check], errors: list[str], suspect: Address | None
    ) -> list[Address]:
        """The candidates, best first: the one server, or whom the sentinels name."""
        if self._sentinels is None:
            return [self.settings.addresses[0]]
        named = await self._sentinels.ask()
        errors[:] = named.errors
        return named.ranked(suspect) + [a for a in checks if a not in named.votes]

    async def _verify(self, address: Address) -> aioredis.Redis | LoomHAError:
        """A client of `address` if it answers as master within `socket_timeout`, else why not."""
        where = f"redis {address[0]}:{address[1]}"
        limit = self.settings.socket_timeout
        client = self._factory.client(address)
        failure: LoomHAError
        try:
            async with asyncio.timeout(limit):  # connect, handshake and ROLE together
                with map_redis_errors(where):
                    role = "master"
                    if self._sentinels is not None:
                        role = text((await execute(client, "ROLE"))[0])
                    else:
                        await client.ping()
        except TimeoutError:
            failure = ConnectionLostError(f"{where}: no answer within {limit}s")
        except LoomHAError as exc:
            failure = exc
        except BaseException:
            await client.aclose(close_connection_pool=True)
            raise
        else:
            if role == "master":
                return client
            failure = ConnectionLostError(f"{where}: role is {role}")
        await client.aclose(close_connection_pool=True)
        return failure


def _best(
    ranked: list[Address], checks: dict[Address, Check]
) -> tuple[tuple[Address, aioredis.Redis] | None, LoomHAError | None]:
    """The first candidate whose check confirmed it after every better one failed.

    Returns (None, None) while a better candidate's check is still pending, and
    (None, error) for a non-transient failure (credentials refused).
    """
    for address in ranked:
        task = checks[address]
        if not task.done():
            return None, None
        result = task.result()
        if isinstance(result, aioredis.Redis):
            return (address, result), None
        if not isinstance(result, ConnectionLostError):
            return None, result
    return None, None
