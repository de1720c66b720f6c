"""An exploding learning rate from outside, as an operator would cause it: `gentrain run`
stops at the first non-finite step, names it, is not retried despite
checkpoint.max_failures, marks its MLflow run FAILED, and leaves no checkpoint with
non-finite weights.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_nonfinite.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from gentrain.checkpoint import MODEL_FILE
from gentrain.nonfinite import STOP_FILE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NAME = "vae-nan"


def test_exploding_lr_stops_once_names_the_parameter_and_saves_nothing_non_finite(tmp_path):
    storage = tmp_path / "runs"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "jobs"), env.get("PYTHONPATH", "")])
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gentrain.cli", "run", "vae/debug", f"name={NAME}", f"storage_path={storage}",
         "train.optimizer.lr=1e30", "checkpoint.max_failures=2", "checkpoint.every=1", "checkpoint.keep=5",
         "train.steps=20", "train.schedule.warmup_steps=2", "scaling.num_workers=2", "eval.every=0",
         "eval.max_batches=1", "eval.num_samples=4", f"tracking.uri={tracking_uri}"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    found = re.findall(r"non-finite values at step (\d+) in network 'vae'", output)
    assert len(found) == 1, output[-6000:]  # reported once: not once per retry
    assert re.search(r"(gradient of|first) (encoder|decoder|to_|from_)[\w.]+\.(weight|bias)", output), output[-6000:]
    assert "lower train.optimizer.lr (now 1e+30" in output
    assert "not retried" in output
    # Ray Train never restarted the workers: a restart would resume from a checkpoint and
    # Ray's failure policy would log its RETRY decision.
    assert "resumed from" not in output and "RETRY" not in output, output[-6000:]
    assert elapsed < 150, f"{elapsed:.0f} s"
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gentrain").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]  # one run, not left RUNNING
    assert not (storage / NAME / STOP_FILE).exists()  # the driver consumed it
    folders = sorted((storage / NAME).glob("step-*"))
    assert folders, "checkpoint.every=1 saves the steps before the failure"
    for folder in folders:
        saved = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
        for network, state in saved["networks"].items():
            for key, value in state.items():
                assert torch.isfinite(value).all(), f"{folder.name}: {network}.{key}"
