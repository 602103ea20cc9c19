"""The line protocol between a benchmark and its worker processes, both ends.

A worker prints JSON lines on stdout (``{"event": ...}``) and reads one-word commands on
stdin; a closed stdin (its parent died) or ``close`` tells it to stop. The parent holds
each worker as a `Child`, which it must `finish()` or `kill()` on every way out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, Self

__all__ = ["EXIT_TIMEOUT", "Child", "commands", "cpu_seconds", "emit", "wait_for"]

EXIT_TIMEOUT = 60.0  # s for a worker to close its clients (deregister) and exit
LINE_LIMIT = 2**27  # bytes: a report may carry every latency sample of a run


class Child:
    """A worker process speaking JSON lines on stdout, commands on stdin."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, module: str, *args: str) -> Self:
        """Run ``python -m module args...`` with pipes on stdin and stdout (stderr inherited)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        return cls(proc)

    def send(self, command: str) -> None:
        """Write one command line (no-op once stdin is closed)."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(f"{command}\n".encode())

    async def expect(self, event: str, timeout: float = 600.0) -> dict[str, Any]:
        """The next message of kind `event` (others are skipped).

        Raises:
            RuntimeError: the worker exited first (its stderr went to ours).
            TimeoutError: none within `timeout` seconds.
        """
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker exited (code {await self.proc.wait()})")
                message: dict[str, Any] = json.loads(line)
                if message.get("event") == event:
                    return message

    def close(self) -> None:
        """Say ``close`` and close stdin: the worker cleans up and exits."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            self.send("close")
            stdin.close()

    async def finish(self, timeout: float = EXIT_TIMEOUT) -> None:
        """Wait for the worker to exit (after `close()`); kill it after `timeout` seconds."""
        if self.proc.returncode is None:
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL the worker if it still runs, and reap it."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` (and its reaped children), from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def emit(event: str, **fields: Any) -> None:
    """Worker side: print one message for the parent."""
    print(json.dumps({"event": event, **fields}), flush=True)


async def commands() -> asyncio.StreamReader:
    """Worker side: stdin as an asyncio stream of command lines."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def wait_for(reader: asyncio.StreamReader, command: str) -> bool:
    """Worker side: wait for `command`; False when told to close (or stdin closed) first."""
    while True:
        line = (await reader.readline()).strip().decode()
        if line == command:
            return True
        if not line or line == "close":
            return False
