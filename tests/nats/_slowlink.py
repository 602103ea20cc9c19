"""SlowLink: a TCP relay to a nats-server that delays a client's SUB commands.

Order is kept (it is one TCP stream); only *time* changes: the bytes before a
client's ``SUB`` pass at once, the ``SUB`` and everything after it arrive `delay`
seconds later, as when that segment is retransmitted. A client that believes its
subscription is effective before the server processed the SUB loses what is
published in that window.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

_SUB = b"SUB "


class SlowLink:
    """Listens on a free loopback port and relays every connection to `url`."""

    def __init__(self, url: str, *, delay: float = 0.3) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 4222
        self.delay = delay
        self.delayed = 0  # SUB commands held back so far
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The URL clients connect to instead of the server's."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)  # cancelled and awaited by __aexit__
        writers = [client_w]
        pipes: list[asyncio.Task[None]] = []
        try:
            server_r, server_w = await asyncio.open_connection(self._host, self._port)
            writers.append(server_w)
            pipes += [
                asyncio.create_task(self._upstream(client_r, server_w)),
                asyncio.create_task(self._pipe(server_r, client_w)),
            ]
            # Either side closing ends the relay (the finally closes the other one).
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._tasks.discard(me)
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in writers:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()


def _sub_command_at(chunk: bytes) -> int:
    """Where the first SUB command starts in `chunk` (a line start), or -1."""
    if chunk.startswith(_SUB):
        return 0
    found = chunk.find(b"\n" + _SUB)
    return found + 1 if found >= 0 else -1
