"""An exploding learning rate from outside, as an operator would cause it: `gentrain run`
stops at the first non-finite step, names it, is not retried despite
checkpoint.max_failures, marks its MLflow run FAILED, and leaves no checkpoint with
non-finite weights. Under train.nonfinite=rollback the same run rolls back with a halved
learning rate until it finishes.

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


def _run(tmp_path, *overrides) -> tuple[subprocess.CompletedProcess, float, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "jobs"), env.get("PYTHONPATH", "")])
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gentrain.cli", "run", "vae/debug", f"storage_path={tmp_path / 'runs'}",
         "scaling.num_workers=2", "eval.every=0", "eval.max_batches=1", "eval.num_samples=4",
         f"tracking.uri={tracking_uri}", *overrides],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    return result, time.monotonic() - started, tracking_uri


def _finite_checkpoints(run_dir: Path) -> list[str]:
    folders = sorted(run_dir.glob("step-*"))
    for folder in folders:
        saved = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
        for network, state in saved["networks"].items():
            for key, value in state.items():
                assert torch.isfinite(value).all(), f"{folder.name}: {network}.{key}"
    return [folder.name for folder in folders]


LR = 200.0  # vae/debug in fp32: 200, 100 and 50 overflow within a few steps, 25 trains (found by trying)


def test_exploding_lr_rolls_back_with_halved_lr_until_it_trains(tmp_path):
    result, elapsed, tracking_uri = _run(
        tmp_path, "name=vae-rollback", f"train.optimizer.lr={LR:g}", "train.nonfinite=rollback",
        "train.nonfinite_max_rollbacks=4", "checkpoint.max_failures=2", "checkpoint.every=4", "checkpoint.keep=10",
        "train.steps=24", "train.schedule.warmup_steps=2", "train.log_every=4")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    lines = re.findall(r"non-finite values at step (\d+) in network 'vae': .*; rolled back to step (\d+) "
                       r"\(.*step-(\d+)\), learning rate x0.5, now ([\d.e+-]+) \(vae\) "
                       r"\(train.nonfinite=rollback: rollback (\d) of at most 4\)", output)
    assert lines, output[-6000:]
    for index, (failed, restored, folder, lr, count) in enumerate(lines, start=1):
        assert int(count) == index and float(lr) == LR / 2 ** index
        assert int(restored) == int(folder) < int(failed)
    assert "resumed from" not in output and "RETRY" not in output, output[-6000:]  # no Ray restart
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("gentrain").experiment_id])
    assert run.info.status == "FINISHED"
    rollbacks = client.get_metric_history(run.info.run_id, "train/nonfinite_rollbacks")
    assert rollbacks and rollbacks[-1].value == len(lines) and rollbacks[-1].step == 24
    assert run.data.tags["gentrain.nonfinite_rollbacks"] == str(len(lines))
    # The repeat rule: steps repeated after a rollback are not logged again.
    steps = [metric.step for metric in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                              key=lambda metric: metric.timestamp)]
    assert steps == sorted(set(steps)) and steps[-1] == 24, steps
    lr_history = client.get_metric_history(run.info.run_id, "train/lr/vae")
    assert max(point.value for point in lr_history if point.step == 24) <= LR / 2 ** len(lines)
    folders = _finite_checkpoints(tmp_path / "runs" / "vae-rollback")
    assert folders[0] == "step-00000000" and folders[-1] == "step-00000024", folders
    print("\n".join(line for line in output.splitlines() if "rolled back" in line or line.startswith("step ")))
    print(f"{len(lines)} rollbacks, {elapsed:.0f} s")


def test_exploding_lr_stops_once_names_the_parameter_and_saves_nothing_non_finite(tmp_path):
    result, elapsed, tracking_uri = _run(
        tmp_path, f"name={NAME}", "train.optimizer.lr=1e30", "checkpoint.max_failures=2", "checkpoint.every=1",
        "checkpoint.keep=5", "train.steps=20", "train.schedule.warmup_steps=2")
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
    assert not (tmp_path / "runs" / NAME / STOP_FILE).exists()  # the driver consumed it
    assert _finite_checkpoints(tmp_path / "runs" / NAME), "checkpoint.every=1 saves the steps before the failure"
