"""A non-editable install ships the YAML spaces and the shipped predictors as package data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIRS = {"search_spaces": "builtin_spaces", "latency_predictors": "builtin_predictors"}
DATA_SUFFIXES = {".yaml", ".json", ".npz", ".csv", ".jsonl", ".md"}


@pytest.mark.slow
def test_non_editable_install_has_package_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    for src, pkg in DATA_DIRS.items():
        expected = {
            p.relative_to(ROOT / src).as_posix()
            for p in (ROOT / src).rglob("*")
            if p.suffix in DATA_SUFFIXES
        }
        installed = {
            p.relative_to(target / "autocomp" / pkg).as_posix()
            for p in (target / "autocomp" / pkg).rglob("*")
            if p.suffix in DATA_SUFFIXES
        }
        assert expected <= installed, f"{pkg} misses {sorted(expected - installed)}"
    # The installed copy (not the checkout) answers the resource lookups.
    probe = (
        "import importlib.resources as r, autocomp; "
        "print(autocomp.__file__); "
        "print(sorted(p.name for p in r.files('autocomp.builtin_spaces').iterdir()))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tmp_path,
    ).stdout.splitlines()
    assert out[0].startswith(str(target))
    for name in (ROOT / "search_spaces").glob("*.yaml"):
        assert name.name in out[1]


def test_pyproject_lists_every_subpackage():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"]) - {f"autocomp.{pkg}" for pkg in DATA_DIRS.values()}
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "autocomp").rglob("__init__.py")
    }
    assert listed == found
