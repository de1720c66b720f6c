"""A training worker killed mid-run: Ray Train restarts the group, the loop resumes from
the latest checkpoint, and the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from processes import train_workers

pytestmark = pytest.mark.slow
GENTRAIN = str(Path(sys.executable).parent / "gentrain")
COMMON = ["train.steps=160", "checkpoint.every=20", "checkpoint.keep=2", "eval.every=0",
          "tracking.enabled=false", "scaling.num_workers=2"]


def command(workdir: Path, name: str, *extra: str) -> list[str]:
    return [GENTRAIN, "run", "vae/debug", f"name={name}", f"storage_path={workdir}", *COMMON, *extra]


def registered(run_dir: Path) -> bool:
    """Ray Train has registered a checkpoint (its snapshot lists one), so a restart finds it.
    A folder on disk alone is not enough: reports the controller has not processed yet are
    dropped when a worker dies."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return "step-" in snapshot.read_text()
    except OSError:
        return False


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "checkpoint_manager_snapshot.json"
    while not registered(run_dir):
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "step-00000160" / "model.pt", weights_only=True)["networks"]["vae"]


def test_killed_worker_resumes_to_the_same_weights(tmp_path):
    straight = subprocess.run(command(tmp_path, "straight"), cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-4000:]

    failing = subprocess.Popen(command(tmp_path, "failing", "checkpoint.max_failures=1"),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    wait_for_checkpoint(tmp_path / "failing", failing)
    victims = train_workers(failing.pid)
    assert victims, "no RayTrainWorker process found to kill"
    os.kill(victims[-1].pid, signal.SIGKILL)
    output, _ = failing.communicate(timeout=600)
    assert failing.returncode == 0, output[-4000:]
    # The restart continues from the newest verified folder (gentrain.loop.restore), which
    # may be newer than the one Ray registered (tests/faults/test_damaged_checkpoints.py).
    assert "[gentrain] resumed from step" in output, f"killed {victims[-1].pid}:\n{output[-8000:]}"

    expected, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "failing")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)
