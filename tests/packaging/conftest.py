"""Session fixtures of the packaging tests: one build, pinned constraints, two virtualenvs.

The sdist and the wheel are built from a copy of the work tree as git sees it (tracked and
not-ignored files): nothing local (.venv, caches, egg-info) can leak into them, and the build
writes nothing into the work tree. `python -m build` builds the wheel *from the sdist*, so a
file the sdist lacks fails the build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from ._dist import ROOT, Dist, make_venv, run, uv_binary, wheel_metadata, work_tree_files

NOT_INSTALLED_EXTRAS = {"dev", "docs"}  # tooling for working on loom-ha, not for using it


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """sdist and wheel of the current work tree, built once per session."""
    source = tmp_path_factory.mktemp("source")
    for name in work_tree_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PATH": f"{uv_binary().parent}{os.pathsep}{os.environ['PATH']}"}
    run([sys.executable, "-m", "build", "--installer", "uv", "--outdir", out, source], env=env)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dist(source=source, sdist=sdist, wheel=wheel)


@pytest.fixture(scope="session")
def lock_constraints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uv.lock's version of every package as pip constraints (they install nothing alone)."""
    path = tmp_path_factory.mktemp("constraints") / "constraints.txt"
    export = [uv_binary(), "export", "--frozen", "--all-extras", "--no-emit-project"]
    run([*export, "--no-hashes", "--no-header", "--quiet", "--output-file", path], cwd=ROOT)
    return path


@pytest.fixture(scope="session")
def full_venv(dist: Dist, lock_constraints: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel with every extra a user may want (not dev/docs), plus pytest for the plugin."""
    extras = wheel_metadata(dist.wheel).get_all("Provides-Extra") or []
    wanted = [e for e in extras if e not in NOT_INSTALLED_EXTRAS]
    venv = tmp_path_factory.mktemp("full") / "venv"
    return make_venv(venv, [dist.requirement(*wanted), "pytest"], lock_constraints)


@pytest.fixture(scope="session")
def redis_only_venv(
    dist: Dist, lock_constraints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """What `pip install 'loom-ha[redis]'` gives."""
    venv = tmp_path_factory.mktemp("redis-only") / "venv"
    return make_venv(venv, [dist.requirement("redis")], lock_constraints)
