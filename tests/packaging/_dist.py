"""Helpers of the packaging tests: the built distribution, uv, and clean virtualenvs.

Virtualenvs use the machine's Python (this one's base interpreter), install through uv with
its cache (network allowed, as for `uv sync`), and are pinned to uv.lock's versions, so a new
upstream release cannot change the outcome.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Dist:
    """What one `python -m build` made."""

    source: Path  # the copy of the work tree it was built from
    sdist: Path
    wheel: Path

    def requirement(self, *extras: str) -> str:
        """``loom-ha[extras] @ file:///...whl``: the built wheel with some of its extras."""
        return f"loom-ha[{','.join(extras)}] @ {self.wheel.as_uri()}"


def uv_binary() -> Path:
    """The project's uv (scripts/_venv.sh installs it into .cache/uv), else one on PATH."""
    local = ROOT / ".cache" / "uv" / "bin" / "uv"
    if local.is_file():
        return local
    found = shutil.which("uv")
    if found is None:
        pytest.fail("uv not found: scripts/test installs it into .cache/uv", pytrace=False)
    return Path(found)


def run(
    args: list[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    expect: int = 0,
) -> subprocess.CompletedProcess[str]:
    """Run a command; an unexpected exit code fails the test with the command's output."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != expect:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {done.returncode} (expected {expect})\n"
            f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}",
            pytrace=False,
        )
    return done


def work_tree_files() -> list[str]:
    """The work tree as a fresh clone plus new files would have it (git's view, no ignored)."""
    out = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    return [name for name in out.stdout.split("\0") if name and (ROOT / name).is_file()]


def make_venv(where: Path, requirements: list[str], constraints: Path) -> Path:
    """A new virtualenv of the machine's Python with `requirements` installed; its root."""
    uv = uv_binary()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    base = Path(sys.base_prefix) / "bin" / "python3"  # the machine's, not the project venv's
    run([uv, "venv", "--quiet", "--python", base, where], env=env)
    python = where / "bin" / "python"
    install = [uv, "pip", "install", "--quiet", "--python", python, "--constraint", constraints]
    run([*install, *requirements], env=env)
    return where


def clean_env(venv: Path) -> dict[str, str]:
    """Only `venv` provides Python packages: no PYTHONPATH, no user site, no project venv."""
    return {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": os.environ.get("HOME", str(venv)),
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONNOUSERSITE": "1",
    }


def wheel_metadata(wheel: Path) -> Message:
    """The METADATA of a wheel (core metadata: an email-header format)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())
