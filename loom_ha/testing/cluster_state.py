"""The state file of a local cluster (`<dir>/cluster.json`): what runs, and how to stop it.

Kept apart from the starting side (`local_cluster`) because `loom-ha down` runs in another
process and needs only this: read the records, check liveness by pid and start time, signal
each stage's process groups. Stdlib only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._pids import ProcessId, signal_group, wait_gone

__all__ = [
    "STATE_FILE",
    "ClusterError",
    "ClusterRunningError",
    "ClusterState",
    "ProcessRecord",
    "StopReport",
    "claim_state_dir",
    "load_state",
    "stop_cluster",
]

STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    """`up` or `down` cannot go on; the message says why and what to do."""


class ClusterRunningError(ClusterError):
    """The state dir records processes that still run: `down` them first."""


@dataclass
class ProcessRecord:
    """One process of the cluster as `cluster.json` records it."""

    name: str
    role: str
    pid: int
    start_time: int | None
    stage: int
    url: str
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Instances: the variables they were given (on top of the caller's environment)."""

    @property
    def process(self) -> ProcessId:
        """The pid and start time, for liveness checks and signals."""
        return ProcessId(self.pid, self.start_time)

    @property
    def alive(self) -> bool:
        """True while this very process (not a reuse of its pid) runs."""
        return self.process.alive


@dataclass
class ClusterState:
    """The contents of `<dir>/cluster.json`."""

    stack: str
    dir: str
    status: str = "starting"
    """starting (up is running), running (up succeeded) or failed (up stopped everything)."""
    started_at: float = field(default_factory=time.time)
    client_env: dict[str, str] = field(default_factory=dict)
    """What a client exports to reach the cluster: LOOM_TRANSPORT, LOOM_HA_REGISTRY, ..."""
    links: dict[str, str] = field(default_factory=dict)
    processes: list[ProcessRecord] = field(default_factory=list)

    def live(self) -> list[ProcessRecord]:
        """The recorded processes that still run."""
        return [p for p in self.processes if p.alive]

    def save(self) -> None:
        """Write the state file atomically."""
        path = Path(self.dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)


def load_state(root: Path) -> ClusterState | None:
    """The state recorded in `root`, or None when there is no state file.

    Raises:
        ClusterError: the file exists but is not a state file this version understands.
    """
    path = root / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read {path}: {exc}") from exc
    try:
        processes = [ProcessRecord(**p) for p in data.pop("processes")]
        return ClusterState(**data, processes=processes)
    except (KeyError, TypeError) as exc:
        raise ClusterError(f"{path} is not a loom-ha cluster state file: {exc}") from exc


def claim_state_dir(root: Path) -> None:
    """Make `root` an empty state dir, refusing a running cluster or a foreign dir."""
    old = load_state(root)
    if old is not None:
        live = old.live()
        if live:
            pids = ", ".join(f"{p.name}={p.pid}" for p in live)
            raise ClusterRunningError(
                f"a {old.stack} cluster is already running from {root} ({pids}): "
                f"stop it first with `loom-ha down --dir {root}`"
            )
        shutil.rmtree(root)  # a stopped or failed run: start over
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ClusterError(
            f"{root} exists and is not a loom-ha state dir (no {STATE_FILE}): "
            "choose another --dir or remove it"
        )
    root.mkdir(parents=True, exist_ok=True)


@dataclass
class StopReport:
    """What `stop_cluster()` found and did."""

    state: ClusterState | None
    """The state file's contents; None when there was none (nothing to stop)."""
    stopped: list[ProcessRecord] = field(default_factory=list)
    """Processes that exited after SIGTERM."""
    killed: list[ProcessRecord] = field(default_factory=list)
    """Processes that needed SIGKILL after the grace period."""


def _stop_group(records: Sequence[ProcessRecord], grace: float, report: StopReport) -> None:
    running = [r for r in records if r.alive]
    for record in running:
        signal_group(record.process, signal.SIGTERM)
    stubborn = {p.pid for p in wait_gone([r.process for r in running], grace)}
    report.stopped += [r for r in running if r.pid not in stubborn]
    killed = [r for r in running if r.pid in stubborn]
    for record in killed:
        signal_group(record.process, signal.SIGKILL)
    left = wait_gone([r.process for r in killed], 5.0)
    report.killed += killed
    if left:
        pids = ", ".join(str(p.pid) for p in left)
        raise ClusterError(f"could not stop pid(s) {pids}, even with SIGKILL")


def stop_cluster(root: Path, *, grace: float = 10.0) -> StopReport:
    """Stop every process recorded in `root` and remove `root`. Idempotent.

    Instances go first, then Sentinels, then brokers and Consul; each group gets SIGTERM,
    and SIGKILL after `grace` seconds. Without a state file nothing is touched.

    Raises:
        ClusterError: the state file is unreadable, or a process survived SIGKILL (the
            state dir is kept then).
    """
    root = root.absolute()
    state = load_state(root)
    report = StopReport(state)
    if state is None:
        return report
    for stage in sorted({p.stage for p in state.processes}):
        _stop_group([p for p in state.processes if p.stage == stage], grace, report)
    shutil.rmtree(root, ignore_errors=True)
    return report
