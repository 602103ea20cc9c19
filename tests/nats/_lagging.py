"""LaggingPongs: a TCP relay to a nats-server that answers PINGs late but is otherwise live.

Everything passes at once except the server's ``PONG`` lines after the handshake's, which
are held back `delay` seconds (messages after a PONG overtake it), as when a busy server's
PONG waits behind a backlog. The relay follows the protocol's framing so a message payload
is never mistaken for a command.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

_PONG = b"PONG\r\n"


class LaggingPongs:
    """Listens on a free loopback port and relays every connection to `url`."""

    def __init__(self, url: str, *, delay: float) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 4222
        self.delay = delay
        self.held = 0  # PONGs held back so far
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)  # cancelled and awaited by __aexit__
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self._host, self._port)
        pipes = [
            self._spawn(self._copy(client_r, server_w)),
            self._spawn(self._downstream(server_r, client_w)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server to client, one protocol unit at a time; PONGs are sent `delay` s late."""
        handshake = True  # the CONNECT's PONG passes: the client waits for it to connect
        while line := await reader.readline():
            if line == _PONG and handshake:
                handshake = False
            elif line == _PONG:
                self.held += 1
                self._spawn(self._late(writer))
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
