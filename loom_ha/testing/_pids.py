"""Processes known only by pid (started by another, finished command): identity, liveness, signals.

`loom-ha up` leaves its servers running in their own sessions; `loom-ha down`, a different
process, stops them from the pids `up` recorded. A pid alone may be reused once its process
is gone, so each one is recorded with its start time (Linux `/proc`) and never signalled when
that no longer matches. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessId", "signal_group", "wait_gone"]

_PROC = Path("/proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from `/proc/<pid>/stat`, None when gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class ProcessId:
    """A pid plus its start time, so that a reused pid is never taken for the original."""

    pid: int
    start_time: int | None = None
    """Clock ticks after boot (`/proc/<pid>/stat` field 22); None where there is no `/proc`."""

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        """The identity of the running process `pid`."""
        stat = _stat(pid)
        return cls(pid, stat[1] if stat is not None else None)

    @property
    def alive(self) -> bool:
        """True while the process runs (stopped counts); False once it exited, even unreaped.

        Processes whose parent exited are adopted by PID 1, which in containers often never
        reaps them: an exited process may stay a zombie, which still answers `kill(pid, 0)`.
        """
        if (_PROC / "self" / "stat").exists():
            stat = _stat(self.pid)
            if stat is None:
                return False
            state, started = stat
            if self.start_time is not None and started != self.start_time:
                return False  # the pid now belongs to another process
            return state not in ("Z", "X", "x")
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def signal_group(process: ProcessId, sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `process` (its own session), if it still runs.

    Launched servers lead their own process group, so forked children get the signal too.
    A stopped (SIGSTOP) group is continued after SIGTERM, or it would never act on it.
    """
    if not process.alive:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # not a group leader after all: signal the process alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
    if sig == signal.SIGTERM:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGCONT)


def wait_gone(processes: Sequence[ProcessId], timeout: float) -> list[ProcessId]:
    """Wait up to `timeout` seconds for every process to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if p.alive]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)
