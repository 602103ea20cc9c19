"""The built wheel installed into clean virtualenvs: what `pip install loom-ha[...]` gives.

Every command runs outside the repository with a clean environment, so only the installed
wheel can answer (a test would pass on the source tree otherwise).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import loom_ha

from ._dist import clean_env, run

CLIENTS_OF_OTHER_EXTRAS = {"nats-py", "py-consul", "python-consul", "aiohttp", "loom-agent"}

IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, loom_ha
failed = {}
for module in pkgutil.walk_packages(loom_ha.__path__, "loom_ha."):
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        failed[module.name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"file": loom_ha.__file__, "version": loom_ha.__version__, "failed": failed}))
"""

REDIS_ONLY = """
import importlib.util, json, sys
from loom_ha.config import create_transport, transport_from_env
from loom_ha.discovery import open_registry

built = [
    type(create_transport("redis+sentinel://s1:26379,s2:26379/mymaster")).__name__,
    type(create_transport("redis://127.0.0.1:6379/0?mode=pubsub&dedup=redis")).__name__,
    type(transport_from_env({"LOOM_TRANSPORT": "redis",
                             "LOOM_HA_REGISTRY": "redis://127.0.0.1:6379/1"})).__name__,
]
refused = {}
for name, attempt in [
    ("loom_ha.nats", lambda: importlib.import_module("loom_ha.nats")),
    ("consul registry", lambda: open_registry("consul://127.0.0.1:8500")),
]:
    try:
        attempt()
    except ImportError as exc:
        refused[name] = str(exc)
print(json.dumps({
    "built": built,
    "refused": refused,
    "findable": [m for m in ("nats", "consul") if importlib.util.find_spec(m) is not None],
    "imported": [m for m in ("nats", "consul", "aiohttp", "loom") if m in sys.modules],
}))
"""


def _python(venv: Path, code: str, cwd: Path) -> dict[str, object]:
    out = run([venv / "bin" / "python", "-c", code], cwd=cwd, env=clean_env(venv))
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_demo_runs_from_the_installed_wheel(full_venv: Path, tmp_path: Path) -> None:
    """`loom-ha demo`, the installed console script, answers every request without an error."""
    out = run(
        [full_venv / "bin" / "loom-ha", "demo", "--requests", "30", "--concurrency", "4"],
        cwd=tmp_path,
        env=clean_env(full_venv),
    )
    rows = re.findall(r"(node/\w+)\W+(\d+)\W+(\d+)\W", out.stdout)
    assert {node for node, _, _ in rows} == {"node/echo", "node/upper", "node/planner"}, out.stdout
    assert sum(int(requests) for _, requests, _ in rows) == 30
    assert all(errors == "0" for _, _, errors in rows), out.stdout
    assert "handler errors 0" in out.stdout


def test_every_module_imports_from_the_installed_wheel(full_venv: Path, tmp_path: Path) -> None:
    """With the user-facing extras installed, every module of the wheel imports, and it is the
    installed copy that answers (version included)."""
    result = _python(full_venv, IMPORT_EVERY_MODULE, tmp_path)
    assert result["failed"] == {}
    assert Path(str(result["file"])).is_relative_to(full_venv)
    assert result["version"] == loom_ha.__version__


def test_redis_extra_pulls_no_nats_or_consul_client(redis_only_venv: Path, tmp_path: Path) -> None:
    """`loom-ha[redis]` installs neither nats-py nor py-consul, and is enough for Redis URLs,
    a Redis registry and Redis dedup; the other extras' modules say which extra they need."""
    installed = {  # dist-info dirs are named <name with _>-<version>.dist-info
        info.name.split("-")[0].replace("_", "-").lower()
        for info in redis_only_venv.glob("lib/python3*/site-packages/*.dist-info")
    }
    assert {"loom-ha", "redis"} <= installed
    assert installed & CLIENTS_OF_OTHER_EXTRAS == set()
    result = _python(redis_only_venv, REDIS_ONLY, tmp_path)
    assert result["findable"] == []
    assert result["imported"] == []
    assert result["built"] == ["HATransport", "HATransport", "BalancedTransport"]
    refused = result["refused"]
    assert isinstance(refused, dict)
    assert "pip install 'loom-ha[nats]'" in refused["loom_ha.nats"]
    assert "pip install 'loom-ha[consul]'" in refused["consul registry"]


def test_demo_without_the_loom_extra_names_it(redis_only_venv: Path, tmp_path: Path) -> None:
    """`loom-ha demo` without loom-agent exits 1 telling which extra to install."""
    out = run(
        [redis_only_venv / "bin" / "loom-ha", "demo"],
        cwd=tmp_path,
        env=clean_env(redis_only_venv),
        expect=1,
    )
    assert "pip install 'loom-ha[loom]'" in out.stdout
