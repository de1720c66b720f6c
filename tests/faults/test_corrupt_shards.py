"""A corrupt shard under `gentrain run`, from outside: with data.on_error=fail (the default)
the run fails fast with one paragraph naming the shard and the fix, no traceback, and its
MLflow run FAILED. (Skipping it and counting the loss: tests/integration/test_remote_data.py.)

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_corrupt_shards.py -q
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from runs import environment

pytestmark = pytest.mark.slow


def test_a_corrupt_shard_fails_fast_with_one_paragraph_naming_it(tmp_path):
    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "gentrain.cli", "data", "pack", "digits", "--out", str(data),
                    "--per-shard", "128"], env=environment(), check=True, capture_output=True, timeout=120)
    bad = data / "train-000004.tar"
    bad.write_bytes(random.Random(13).randbytes(bad.stat().st_size))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "gentrain.cli", "run", "vae/debug", "name=bad-shard", f"data.source={data}",
         f"storage_path={tmp_path / 'runs'}", "train.steps=30", "train.schedule.warmup_steps=2",
         "checkpoint.every=5", "eval.every=0", "eval.max_batches=1", f"tracking.uri={uri}"],
        cwd=tmp_path, env=environment(), text=True, capture_output=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: training bad-shard failed: worker ") and f"cannot read shard {bad}: " in error
    assert "set `data.on_error: skip`; then run the same command to " in error, error
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gentrain").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
