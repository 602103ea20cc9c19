"""The sdist and the wheel: valid for PyPI, exactly the package, one version everywhere."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import PurePosixPath

import loom_ha

from ._dist import ROOT, Dist, run, wheel_metadata

# What setuptools adds beside the package; anything else in a distribution is a stray file.
WHEEL_DIST_INFO = {
    "METADATA",
    "WHEEL",
    "entry_points.txt",
    "top_level.txt",
    "RECORD",
    "licenses/LICENSE",
}
SDIST_TOP = {
    "PKG-INFO",
    "README.md",
    "LICENSE",
    "pyproject.toml",
    "setup.cfg",
    "loom_ha",
    "loom_ha.egg-info",
}


def _package_files(dist: Dist) -> set[str]:
    """Every file of loom_ha/ in the tree the distribution was built from."""
    package = dist.source / "loom_ha"
    return {p.relative_to(dist.source).as_posix() for p in package.rglob("*") if p.is_file()}


def test_twine_check_passes(dist: Dist) -> None:
    """`twine check --strict` accepts both files (metadata and README render for PyPI)."""
    out = run([sys.executable, "-m", "twine", "check", "--strict", dist.sdist, dist.wheel])
    assert out.stdout.count("PASSED") == 2, out.stdout


def test_wheel_holds_the_package_and_nothing_else(dist: Dist) -> None:
    """The wheel is loom_ha/ file for file (py.typed included) plus its dist-info: no tests/,
    no docs, no caches or compiled files."""
    version = wheel_metadata(dist.wheel)["Version"]
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
    info_dir = f"loom_ha-{version}.dist-info/"
    info = {n.removeprefix(info_dir) for n in names if n.startswith(info_dir)}
    assert info == WHEEL_DIST_INFO
    assert {n for n in names if not n.startswith(info_dir)} == _package_files(dist)
    assert "loom_ha/py.typed" in names


def test_sdist_holds_what_a_build_needs_and_no_tests(dist: Dist) -> None:
    """The sdist has the package, pyproject and README (the wheel was built from it), and
    none of tests/, docs/, scripts/ or local state."""
    root = dist.sdist.name.removesuffix(".tar.gz")
    with tarfile.open(dist.sdist) as sdist:
        files = {PurePosixPath(m.name).relative_to(root) for m in sdist.getmembers() if m.isfile()}
    assert {f.parts[0] for f in files} == SDIST_TOP
    assert {f.as_posix() for f in files if f.parts[0] == "loom_ha"} == _package_files(dist)


def test_metadata_is_single_sourced_and_complete(dist: Dist) -> None:
    """The version is `loom_ha.__version__`; classifiers, project URLs, the README as the
    long description, and the `loom-ha` command are in the metadata."""
    meta = wheel_metadata(dist.wheel)
    assert meta["Version"] == loom_ha.__version__
    assert meta["Name"] == "loom-ha"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "Typing :: Typed" in meta.get_all("Classifier", [])
    assert meta.get_all("Project-URL")
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().strip() == (ROOT / "README.md").read_text().strip()
    with zipfile.ZipFile(dist.wheel) as wheel:
        entry_points = wheel.read(f"loom_ha-{meta['Version']}.dist-info/entry_points.txt")
    assert b"loom-ha = loom_ha.cli:main" in entry_points
    assert b"loom_ha = loom_ha.testing.plugin" in entry_points


def test_changelog_has_a_section_for_this_version() -> None:
    """CHANGELOG.md names the current version (bumping it means writing its entry)."""
    headings = [
        line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")
    ]
    assert headings[0] == "## Unreleased"
    assert any(h.startswith(f"## {loom_ha.__version__} ") for h in headings), headings
