"""Following a server that stops answering: the one place loom-ha reaches into nats-py.

A frozen server (SIGSTOP, a VM or GC pause, a full disk) keeps its socket open, so nothing
errors. nats-py's own dead-peer check (a PING every ``ping_interval``, 120 s by default)
does fire eventually, but its reconnect first closes the socket and waits for the close,
and asyncio closes a socket only once its write buffer reached a peer that no longer reads:
under load the reconnect hangs until the server comes back (seen: publishing stalled for a
whole 8 s freeze). Hence, all on nats-py's private surface (checked against the locked
nats-py by tests/nats/test_liveness.py and test_freeze.py):

* `Liveness` sends its own PINGs and counts intervals that end with one unanswered and no
  other sign of life;
* `cut()` aborts the socket, dropping its write buffer, so the reconnect goes on at once;
* `ServerChooser` makes the reconnect try first the servers it did not just lose;
* `answered()` is a PING/PONG that never cancels nats-py's PONG future: nats-py sets a late
  PONG's result on it, and on a cancelled future that error ends its read loop (the
  connection then looks open but reads nothing), which ``flush(timeout)`` triggers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import ParseResult

from nats.aio.client import Client

__all__ = ["Liveness", "ServerChooser", "answered", "close_client", "cut"]

log = logging.getLogger("loom_ha.nats")

CHOOSER_SUPPORTED = "reconnect_to_server_handler" in inspect.signature(Client.connect).parameters
"""Whether this nats-py lets the caller pick the server to reconnect to (2.16 does; older
releases without ``reconnect_to_server_handler`` pick at random)."""


async def _ping(client: Client) -> asyncio.Future[bool]:
    """Send a PING; the future resolves with its PONG (and is never cancelled by us)."""
    pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    try:
        # Writes the PING at once; only the flusher kick may wait (a full flush queue).
        async with asyncio.timeout(1.0):
            await client._send_ping(pong)
    except TimeoutError:
        pass  # the PING is written; the flusher is stuck behind a server that does not read
    return pong


async def answered(client: Client, timeout: float) -> bool:
    """Whether the server answers a PING within `timeout` seconds."""
    if not client.is_connected:
        return False
    pong = await _ping(client)
    done, _ = await asyncio.wait({pong}, timeout=timeout)
    return bool(done)


def cut(client: Client, *, drop_pending: bool = False) -> None:
    """Abort the client's socket now, without waiting for its write buffer to drain.

    nats-py sees the end of the stream and reconnects (keeping its own pending buffer for
    the next server unless `drop_pending`: on close, that data has nowhere to go).
    """
    transport = getattr(client, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):  # TLS wraps the bare TCP writer
        writer = getattr(transport, name, None)
        sock = getattr(writer, "transport", None)
        if sock is not None:
            sock.abort()
    if drop_pending:
        client._pending = []
        client._pending_data_size = 0


async def close_client(client: Client, timeout: float) -> None:
    """Close `client`, cutting the socket first when the server shows no sign of life for
    `timeout` seconds (see `Liveness`).

    nats-py's close writes what is still pending and waits for the socket to close, both
    forever on a frozen server. A server that answers gets everything written before the
    close (core publishes made just before `disconnect()` are not dropped).
    """
    if not await _answering(client, timeout):
        cut(client, drop_pending=True)
    closing = asyncio.ensure_future(client.close())
    done, _ = await asyncio.wait({closing}, timeout=timeout)
    if not done:  # froze during the close itself
        cut(client, drop_pending=True)
        done, _ = await asyncio.wait({closing}, timeout=timeout)
    if not done:
        # nats-py also waits forever for a stream whose socket a failed TLS handshake took
        # over (the last reconnect met a certificate that does not verify); asyncio closed
        # that socket already, and every other step of the close is done: stop waiting.
        closing.cancel()
        await asyncio.wait({closing})
        return
    await closing


def _progress(client: Client) -> tuple[int, int, int]:
    """Marks that move while the server works for us: messages read from it, and what we
    still have to write (nats-py's pending buffer, the socket's write buffer)."""
    writer = getattr(getattr(client, "_transport", None), "_io_writer", None)
    sock = getattr(writer, "transport", None)
    unwritten = sock.get_write_buffer_size() if sock is not None else 0
    return client.stats["in_msgs"], client.pending_data_size, unwritten


def _alive(before: tuple[int, int, int] | None, now: tuple[int, int, int]) -> bool:
    """Whether the server sent us a message or read what we wrote since `before`."""
    if before is None:
        return False
    return now[0] != before[0] or now[1] < before[1] or now[2] < before[2]


async def _answering(client: Client, timeout: float) -> bool:
    """Whether the server answers a PING, given `timeout` seconds after each sign of work."""
    if not client.is_connected:
        return False
    pong = await _ping(client)
    marks = _progress(client)
    while True:
        done, _ = await asyncio.wait({pong}, timeout=timeout)
        if done:
            return True
        before, marks = marks, _progress(client)
        if not _alive(before, marks):
            return False


class Liveness:
    """Declares the server dead when `misses` intervals in a row end with a PING unanswered
    and no sign of work: no message read from it, none of our backlog taken by it.

    A PONG comes after everything queued before it, both ways: a server sending a
    subscriber its backlog, or reading a fast publisher's megabytes on a loaded machine,
    answers late yet is plainly alive (seen on 2 cores at load 5-9: PONGs up to 5 s late;
    with PONGs alone, a flooded core subscriber was cut off 6 times in 25 s and a flooding
    publisher once or twice; with these signs, never in 6 such runs). A frozen server does
    neither. Intervals are counted, not wall time: a stalled event loop (a CPU-bound
    handler) costs at most one miss, since what waited in the socket is read before the
    next tick. Detection comes ``interval * misses`` to ``interval * (misses + 1)``
    seconds after the server's last sign of work.
    """

    def __init__(
        self,
        client: Callable[[], Client | None],
        generation: Callable[[], int],
        on_dead: Callable[[Client], None],
        *,
        interval: float,
        misses: int,
    ) -> None:
        self._client = client
        self._generation = generation
        self._on_dead = on_dead
        self.interval = interval
        self.misses = misses

    async def run(self) -> None:
        """Ping until cancelled; call `on_dead` (then cut the socket) for a silent server."""
        pong: asyncio.Future[bool] | None = None
        missed = 0
        generation = self._generation()
        marks: tuple[int, int, int] | None = None
        while True:
            await asyncio.sleep(self.interval)
            client = self._client()
            if client is None or not client.is_connected:
                pong, missed = None, 0  # nats-py is reconnecting: its handshake checks the server
                continue
            if self._generation() != generation:  # a new socket: the old PING died with the old
                generation, pong, missed, marks = self._generation(), None, 0, None
            before, marks = marks, _progress(client)
            if pong is not None and not pong.done() and not _alive(before, marks):
                missed += 1
                if missed >= self.misses:
                    pong, missed = None, 0
                    self._on_dead(client)
                    cut(client)
                continue
            missed = 0
            if pong is None or pong.done():
                try:
                    pong = await _ping(client)
                except Exception as exc:  # a socket nats-py is tearing down: it reconnects
                    log.debug("liveness: no PING sent: %r", exc)
                    pong = None


def _key(uri: ParseResult) -> str:
    return f"{uri.hostname}:{uri.port}"


class ServerChooser:
    """nats-py's ``reconnect_to_server_handler``: the server tried least recently goes first,
    and the one just lost counts as tried when it was lost.

    nats-py's own choice is the shuffled pool, which tries the frozen server first in one
    reconnect out of three and waits `connect_timeout` on it. A server is retried at most
    once per `wait` seconds (nats-py's ``reconnect_time_wait``), so a whole cluster down is
    not hammered.
    """

    def __init__(self, wait: float) -> None:
        self._wait = wait
        self._tried: dict[str, float] = {}

    def lost(self, uri: ParseResult | None) -> None:
        """The connection to `uri` was just lost."""
        if uri is not None:
            self._tried[_key(uri)] = time.monotonic()

    def __call__(self, servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        if not servers:
            return None, 0.0
        now = time.monotonic()
        chosen = min(servers, key=lambda s: self._tried.get(_key(s.uri), -math.inf))
        last = self._tried.get(_key(chosen.uri))
        delay = 0.0 if last is None else max(0.0, last + self._wait - now)
        self._tried[_key(chosen.uri)] = now + delay
        return chosen, delay
