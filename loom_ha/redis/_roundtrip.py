"""One round trip of commands that knows whether a failure came before or after sending.

`RedisConnector.execute` builds on it: a command that cannot have reached Redis
is safe to send again; one that may have run is re-sent only where duplicates
are allowed (Streams' XADD) and never for Pub/Sub's at-most-once PUBLISH.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection

from loom_ha.errors import ConnectionLostError, TransportError
from loom_ha.redis._errors import REDIS_ERRORS, translate

# Error replies (not broken connections): Redis refused the command without running it.
_REFUSALS = (rex.ResponseError, rex.BusyLoadingError)


class UnconfirmedError(TransportError):
    """Commands were sent, but the connection failed before Redis replied: they may have run.

    Raised by `RedisConnector.execute` when re-sending is not allowed (Pub/Sub's
    at-most-once PUBLISH): the caller decides what an unconfirmed command means.
    """


class Written(Exception):
    """A round trip failed after its commands were written (never leaves the connector)."""

    def __init__(self, error: ConnectionLostError, cause: BaseException | None) -> None:
        super().__init__(str(error))
        self.error, self.cause = error, cause


async def checkout(pool: Any) -> AbstractConnection:
    """A connected connection from `pool` (redis-py leaves `get_connection` untyped)."""
    conn: AbstractConnection = await pool.get_connection()
    return conn


async def round_trip(
    conn: AbstractConnection,
    commands: Sequence[Sequence[Any]],
    what: str,
    check: Callable[[list[Any]], None] | None,
) -> list[Any]:
    """Write `commands` on `conn` and read a reply for each.

    Raises:
        ConnectionLostError: Redis refused the first command (READONLY, LOADING...):
            none of them ran.
        Written: the connection failed (or `check` raised `ConnectionLostError`) after
            the commands were written: Redis may have run them.
        TransportError / ConfigurationError: a non-transient error reply.
    """
    replies: list[Any] = []
    try:
        # From here on a failure may come after Redis executed the commands (even a
        # timed-out write can still flush: the socket is closed gracefully).
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        for _ in commands:
            replies.append(await conn.read_response())
        if check is not None:
            check(replies)
    except REDIS_ERRORS as exc:
        await conn.disconnect(nowait=True)  # replies may be left unread: never reuse it
        mapped = translate(exc, what)
        if not isinstance(mapped, ConnectionLostError):
            raise (mapped or exc) from exc
        if not replies and isinstance(exc, _REFUSALS):
            raise mapped from exc
        raise Written(mapped, exc) from exc
    except ConnectionLostError as exc:  # `check` asked for another attempt
        raise Written(exc, exc.__cause__) from exc
    except BaseException:  # cancelled mid-command: the reply must not reach the next user
        await conn.disconnect(nowait=True)
        raise
    return replies
