"""A job type from a package of its own (tests/fixtures/toy_family: `acme_density`, job type
`diaggauss`), installed by pip beside gentrain as a user would, offline, then listed,
validated, trained through Ray and sampled with the `gentrain` command alone.

    pytest tests/integration/test_plugin_family.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "toy_family"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """pip installs a copy of the fixture into a folder put on PYTHONPATH (no network, no
    build isolation: the build uses the setuptools already installed)."""
    root = tmp_path_factory.mktemp("plugin")
    source, target = root / "toy_family", root / "site"
    shutil.copytree(FIXTURE, source)  # the build writes build/ and *.egg-info beside the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    assert (target / "acme_density" / "specs" / "debug.yaml").is_file()
    path = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    return {"env": dict(os.environ, PYTHONPATH=path), "cwd": root}


def gentrain(installed: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gentrain.cli", *args], env=installed["env"],
                            cwd=installed["cwd"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"gentrain {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_an_installed_family_lists_validates_trains_and_samples(installed):
    listing = gentrain(installed, "list").stdout
    assert "diaggauss" in listing and "  diaggauss/debug" in listing
    assert "diaggauss/debug: ok (diaggauss, ddp/fp32" in gentrain(installed, "validate", "diaggauss/debug").stdout

    runs = installed["cwd"] / "runs"
    result = gentrain(installed, "run", "diaggauss/debug", f"storage_path={runs}", "tracking.enabled=false",
                      "train.steps=20", "eval.every=10", "checkpoint.every=10")
    out = result.stdout + result.stderr
    run_dir = runs / "diaggauss-debug"
    assert "[gentrain] step 20/20" in out and "eval at step 20 | bits_per_dim" in out
    assert (run_dir / "step-00000020" / "gentrain.json").is_file()
    assert (run_dir / "samples" / "step-00000020.png").is_file()

    grid = installed["cwd"] / "cold.png"
    sampled = gentrain(installed, "sample", str(run_dir), "--n", "16", "--out", str(grid), "--set", "temperature=0.5")
    assert "16 samples of diaggauss-debug (step 20" in sampled.stdout and grid.is_file()
    sevens = installed["cwd"] / "sevens.png"
    gentrain(installed, "sample", str(run_dir), "--n", "8", "--out", str(sevens), "--labels", "7")
    assert sevens.is_file() and sevens.read_bytes() != grid.read_bytes()
