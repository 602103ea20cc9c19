"""Node-server processes (tests/loom/node_server.py) for the multi-process Loom tests."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

SERVER = Path(__file__).with_name("node_server.py")


class NodeProcesses:
    """Node-server processes on one URL; each logs the requests it processed."""

    def __init__(self, url: str, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.url, self.workdir, self.env = url, workdir, env
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, count: int) -> None:
        for i in range(count):
            log = self.workdir / f"instance{i}.log"
            log.touch()
            proc = subprocess.Popen(
                [sys.executable, str(SERVER), self.url, f"instance{i}", str(log)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, **self.env, "LOOM_HA_INSTANCE_ID": f"instance{i}"}
                if self.env
                else None,
            )
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "READY", f"node server did not start (got {line!r})"

    def processed(self) -> collections.Counter[str]:
        """How many times each request id was processed, over every instance."""
        counts: collections.Counter[str] = collections.Counter()
        for log in self.workdir.glob("instance*.log"):
            for line in log.read_text().splitlines():
                counts[line] += 1
        return counts

    def per_instance(self, node: str) -> list[int]:
        """Requests of `node` processed by each instance."""
        return [
            sum(1 for line in log.read_text().splitlines() if line.startswith(node + " "))
            for log in sorted(self.workdir.glob("instance*.log"))
        ]

    def kill(self, index: int) -> None:
        """SIGKILL instance `index`: no deregistration, no goodbye."""
        self.procs[index].kill()
        self.procs[index].wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
