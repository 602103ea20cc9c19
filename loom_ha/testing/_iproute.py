"""The kernel side of `loom_ha.testing.netns`: run iproute2's `ip`, enter a namespace from one
thread, pick a free private subnet, and sweep what killed runs left behind.

Names made here carry the creating pid (``loomha-<pid>-...``, ``lh<pid hex>-<n>``), so a sweep
removes only what belongs to processes that are gone. Stdlib only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import random
import re
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "GUARD_METRIC",
    "PREFIX",
    "NetworkError",
    "free_subnet",
    "ip",
    "ip_batch",
    "netns_exec",
    "require_root",
    "run_in_netns",
    "sweep",
    "sweep_once",
]

T = TypeVar("T")

PREFIX = "loomha"
"""Every namespace made here is named ``loomha-<pid>-<n>-<member>``."""

GUARD_METRIC = 0x4C000000
"""Metric base of the guard routes (``unreachable <subnet> metric GUARD_METRIC + pid``)."""

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_NAMESPACE = re.compile(rf"^{PREFIX}-(\d+)-\d+-[a-z0-9-]+$")
HOST_LINK = re.compile(r"^lh([0-9a-f]+)-(\d+)$")
"""The test process's own end of a network's host link: ``lh<pid hex>-<n>``."""

_swept = threading.Lock()
_swept_once: list[bool] = []


class NetworkError(RuntimeError):
    """A namespace or link could not be made or changed; the message names the command."""


def _ip_binary() -> str:
    found = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NetworkError("iproute2's `ip` is not installed (Debian: apt-get install iproute2)")
    return found


def netns_exec(netns: str, argv: list[str]) -> list[str]:
    """`argv` wrapped to run inside network namespace `netns` (`ip netns exec` keeps the pid)."""
    return [_ip_binary(), "netns", "exec", netns, *argv]


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip [-n netns] args...`; return its output.

    Raises:
        NetworkError: it failed; the message holds the command line and its stderr.
    """
    argv = [_ip_binary(), *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetworkError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def ip_batch(commands: list[str], *, netns: str) -> None:
    """Run `commands` (lines of `ip` arguments) in one `ip -n netns -batch -` process.

    One process applies a whole partition or heal in milliseconds, even on a loaded machine;
    one `ip` per port would let clients act on a half-healed network between two commands.

    Raises:
        NetworkError: a command failed (`ip` stops there); the message holds its stderr.
    """
    if not commands:
        return
    argv = [_ip_binary(), "-n", netns, "-batch", "-"]
    script = "\n".join(commands) + "\n"
    done = subprocess.run(argv, input=script, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetworkError(
            f"`{' '.join(argv)}` failed on {commands!r}: {done.stderr.strip() or done.returncode}"
        )


def require_root() -> None:
    """Raise `NetworkError` saying why, when this process cannot make network namespaces."""
    if os.geteuid() != 0:
        raise NetworkError(
            "network partitions need root (CAP_NET_ADMIN) to create Linux network "
            f"namespaces; this process runs as uid {os.geteuid()}: run the tests as root "
            "(e.g. in the CI container) or deselect them"
        )
    _ip_binary()


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep() -> list[str]:
    """Remove namespaces, host links and guard routes whose creating process is gone (those of
    live processes are never touched); return what was removed."""
    removed: list[str] = []
    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    for name in names:
        match = _NAMESPACE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(NetworkError):
                ip("netns", "delete", name)
                removed.append(name)
    for line in ip("-o", "link", "show").splitlines():
        parts = line.split(":")
        link = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        match = HOST_LINK.match(link)
        if match and not _pid_alive(int(match.group(1), 16)):
            with contextlib.suppress(NetworkError):
                ip("link", "delete", link)
                removed.append(link)
    for line in ip("-4", "route", "show", "type", "unreachable").splitlines():
        fields = line.split()
        if "metric" not in fields:
            continue
        pid = int(fields[fields.index("metric") + 1]) - GUARD_METRIC
        if 0 < pid < GUARD_METRIC and not _pid_alive(pid):
            with contextlib.suppress(NetworkError):
                ip("route", "delete", *fields)
                removed.append(f"route {' '.join(fields)}")
    return removed


def sweep_once() -> None:
    """`sweep()` on the first call in this process only."""
    with _swept:
        if not _swept_once:
            sweep()
            _swept_once.append(True)


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no route here (other runs' networks included)."""
    taken: list[ipaddress.IPv4Network] = []
    for line in ip("-4", "route", "show", "table", "all").splitlines():
        words = line.split()
        if words and words[0] in ("unreachable", "blackhole", "prohibit", "local", "broadcast"):
            words = words[1:]
        with contextlib.suppress(ValueError, IndexError):
            route = ipaddress.IPv4Network(words[0], strict=False)
            if route.prefixlen > 0:
                taken.append(route)
    for _ in range(100):
        candidate = ipaddress.IPv4Network(
            f"10.{random.randint(64, 254)}.{random.randint(0, 255)}.0/24"
        )
        if not any(candidate.overlaps(route) for route in taken):
            return candidate
    raise NetworkError("no free 10.x.y.0/24 left for a test network")


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into `netns`: sockets it opens from now live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise NetworkError(f"setns({netns}) failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


async def run_in_netns(netns: str, fn: Callable[[], Awaitable[T]], *, name: str) -> T:
    """Run `fn()` on a fresh event loop in a new thread (named `name`) inside `netns`.

    The thread is never reused, so no other code ever runs in the namespace by accident;
    threads `fn` starts inherit it. Cancelling the caller cancels `fn` and waits for it.
    """
    outer = asyncio.get_running_loop()
    finished: asyncio.Future[T] = outer.create_future()
    lock = threading.Lock()
    inner: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[object]]] = []
    cancelled = threading.Event()

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        with lock:
            inner.append((asyncio.get_running_loop(), task))
        if cancelled.is_set():
            raise asyncio.CancelledError
        return await fn()

    def settle(error: BaseException | None, value: T | None) -> None:
        if finished.done():
            return
        if error is not None:
            finished.set_exception(error)
        else:
            finished.set_result(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            _enter_netns(netns)
            value = asyncio.run(main())
        except BaseException as exc:  # handed to the awaiting caller, never lost
            outer.call_soon_threadsafe(settle, exc, None)
        else:
            outer.call_soon_threadsafe(settle, None, value)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(finished)
    except asyncio.CancelledError:
        cancelled.set()
        with lock:
            for loop, task in inner:
                with contextlib.suppress(RuntimeError):  # its loop already closed: it ended
                    loop.call_soon_threadsafe(task.cancel)
        with contextlib.suppress(BaseException):
            await finished  # the thread always settles it
        raise
    finally:
        await asyncio.to_thread(thread.join)
