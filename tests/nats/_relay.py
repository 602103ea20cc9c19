"""A TCP relay to a nats-server that changes the timing of one kind of protocol unit.

`NatsRelay` listens on a free loopback port and relays every connection to the server;
bytes pass as they come. Its subclasses hold one thing back, keeping everything else live:

- `SlowLink` delays a client's ``SUB`` commands (and, one TCP stream, all that follows), as
  when that segment is retransmitted: a client that believes its subscription is effective
  before the server processed the SUB loses what is published in that window.
- `LaggingPongs` sends the server's ``PONG`` lines after the handshake's late (messages
  after a PONG overtake it), as when a busy server's PONG waits behind a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

_SUB = b"SUB "
_PONG = b"PONG\r\n"


class NatsRelay:
    """Listens on a free loopback port and relays every connection to `url`."""

    def __init__(self, url: str, *, delay: float) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 4222
        self.delay = delay
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The URL clients connect to instead of the server's."""
        assert self._server is not None
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in a task the relay cancels and awaits when it closes."""
        self._track(asyncio.create_task(coro))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._track(me)  # the connection's handler: cancelled and awaited on close too
        writers = [client_w]
        pipes: list[asyncio.Task[None]] = []
        try:
            server_r, server_w = await asyncio.open_connection(self._host, self._port)
            writers.append(server_w)
            pipes += [
                asyncio.create_task(self.upstream(client_r, server_w)),
                asyncio.create_task(self.downstream(server_r, client_w)),
            ]
            # Either side closing ends the relay (the finally closes the other one).
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in writers:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server: as it comes."""
        await _copy(reader, writer)

    async def downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server to client: as it comes."""
        await _copy(reader, writer)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()


class SlowLink(NatsRelay):
    """A relay whose client ``SUB`` commands, and what follows them, arrive `delay` s late."""

    def __init__(self, url: str, *, delay: float = 0.3) -> None:
        super().__init__(url, delay=delay)
        self.delayed = 0  # SUB commands held back so far

    async def upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server: everything from a SUB on arrives `delay` seconds late."""
        while chunk := await reader.read(65536):
            at = _sub_command_at(chunk)
            if at >= 0:
                writer.write(chunk[:at])
                await writer.drain()
                self.delayed += 1
                await asyncio.sleep(self.delay)
                chunk = chunk[at:]
            writer.write(chunk)
            await writer.drain()


def _sub_command_at(chunk: bytes) -> int:
    """Where the first SUB command starts in `chunk` (a line start), or -1."""
    if chunk.startswith(_SUB):
        return 0
    found = chunk.find(b"\n" + _SUB)
    return found + 1 if found >= 0 else -1


class LaggingPongs(NatsRelay):
    """A relay whose server ``PONG``s (after the handshake's) reach the client `delay` s late."""

    def __init__(self, url: str, *, delay: float) -> None:
        super().__init__(url, delay=delay)
        self.held = 0  # PONGs held back so far

    async def downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server to client, one protocol unit at a time, so a message payload is never
        mistaken for a command; PONGs are sent `delay` s late."""
        handshake = True  # the CONNECT's PONG passes: the client waits for it to connect
        while line := await reader.readline():
            if line == _PONG and handshake:
                handshake = False
            elif line == _PONG:
                self.held += 1
                self.spawn(self._late(writer))
                continue
            unit = line
            head = line.split()
            if head and head[0] in (b"MSG", b"HMSG"):
                unit += await reader.readexactly(int(head[-1]) + 2)  # payload and its CRLF
            writer.write(unit)
            await writer.drain()

    async def _late(self, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.delay)
        with contextlib.suppress(OSError):
            writer.write(_PONG)
