"""The package surface: cheap to import, typed, and registered as a pytest plugin."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import loom_ha


def test_import_loads_no_broker_client() -> None:
    """`import loom_ha` pulls in neither redis, nats, consul nor aiohttp."""
    code = (
        "import sys, loom_ha, loom_ha.testing.plugin; "
        "bad = [m for m in ('redis', 'nats', 'consul', 'aiohttp', 'loom') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_are_sorted_and_exist() -> None:
    """__all__ is sorted and every name in it resolves."""
    assert loom_ha.__all__ == sorted(loom_ha.__all__)
    for name in loom_ha.__all__:
        assert hasattr(loom_ha, name), name


def test_ships_type_information_and_pytest_plugin() -> None:
    """py.typed is in the package and the fixtures are a pytest11 entry point."""
    assert (Path(loom_ha.__file__).parent / "py.typed").exists()
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("loom_ha") == "loom_ha.testing.plugin"
