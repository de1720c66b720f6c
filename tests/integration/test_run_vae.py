"""End to end: `gentrain run vae/debug` on an embedded Ray with 2 workers, shards packed
from scikit-learn's digits, tracked in a real MLflow server; then the same command again
continues from the checkpoint in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

pytestmark = pytest.mark.slow
GENTRAIN = str(Path(sys.executable).parent / "gentrain")


def gentrain_run(workdir: Path, tracking_uri: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    result = subprocess.run([GENTRAIN, "run", "vae/debug", f"storage_path={workdir / 'runs'}",
                             "tracking.experiment=e2e", *overrides],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"gentrain run failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, mlflow_server):
    workdir = tmp_path_factory.mktemp("e2e")
    result = gentrain_run(workdir, mlflow_server)
    return workdir, result


def the_run(uri: str):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per job"
    return client, runs[0]


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_run_prints_where_everything_is(first_run):
    workdir, result = first_run
    out = result.stdout + result.stderr
    assert "[gentrain] step 300/300" in out
    assert "samples/s" in out and "eta" in out
    run_dir = workdir / "runs" / "vae-debug"
    assert f"checkpoints : {run_dir / 'step-00000300'}" in out
    assert f"samples     : {run_dir / 'samples' / 'step-00000300.png'}" in out
    assert "mlflow run  :" in out


def test_mlflow_run_has_params_metrics_and_artifacts(first_run, mlflow_server):
    client, run = the_run(mlflow_server)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "vae-debug"
    params = run.data.params
    assert params["train.steps"] == "300"
    assert params["scaling.num_workers"] == "2"
    assert params["job.config.likelihood"] == "bernoulli"
    losses = history(client, run.info.run_id, "train/loss")
    # rank 0 only: exactly one point per logged step
    assert [step for step, _ in losses] == list(range(25, 301, 25))
    assert losses[-1][1] < losses[0][1]
    assert all(v > 0 for _, v in history(client, run.info.run_id, "train/samples_per_second"))
    assert history(client, run.info.run_id, "train/lr/vae")
    assert history(client, run.info.run_id, "train/grad_norm/vae")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec", "samples"} <= artifacts
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/step-00000300.png" in samples
    assert "spec/resolved.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "spec")}


def test_vae_learns_test_elbo_improves_by_a_clear_margin(first_run, mlflow_server):
    client, run = the_run(mlflow_server)
    elbo = dict(history(client, run.info.run_id, "eval/elbo"))
    assert set(elbo) == {0, 150, 300}
    # Held-out ELBO in nats per 8x8 digit: about -45 at initialisation.
    assert elbo[300] > elbo[0] + 10.0, elbo
    assert elbo[300] > elbo[150]


def test_checkpoints_on_disk_keep_the_latest_k(first_run):
    workdir, _ = first_run
    run_dir = workdir / "runs" / "vae-debug"
    steps = sorted(p.name for p in run_dir.glob("step-*"))
    assert steps == ["step-00000200", "step-00000300"]  # checkpoint.keep: 2
    meta = json.loads((run_dir / "step-00000300" / "gentrain.json").read_text())
    assert meta["step"] == 300 and meta["world_size"] == 2
    weights = torch.load(run_dir / "step-00000300" / "model.pt", weights_only=True)
    portable = torch.load(run_dir / "step-00000300" / "portable_state.pt", weights_only=True)
    assert "vae" in weights["networks"] and "vae" in portable["optimizers"]
    # ddp_state.pt holds the loss scaler only: weights and Adam moments are stored once
    assert set(torch.load(run_dir / "step-00000300" / "ddp_state.pt", weights_only=True)) == {"scaler"}


def test_rerun_resumes_from_checkpoint_into_the_same_mlflow_run(first_run, mlflow_server):
    workdir, _ = first_run
    client, before = the_run(mlflow_server)
    result = gentrain_run(workdir, mlflow_server, "train.steps=350")
    out = result.stdout + result.stderr
    assert "resumed from step 300" in out
    assert "[gentrain] step 325/350" in out
    assert "step 25/" not in out  # did not start over
    client, after = the_run(mlflow_server)
    assert after.info.run_id == before.info.run_id
    assert after.info.status == "FINISHED"
    steps = [step for step, _ in history(client, after.info.run_id, "train/loss")]
    assert steps == list(range(25, 301, 25)) + [325, 350]
    assert (workdir / "runs" / "vae-debug" / "step-00000350" / "gentrain.json").is_file()


def test_sample_from_the_trained_run_logs_into_its_mlflow_run(first_run, mlflow_server, tmp_path):
    from PIL import Image

    workdir, _ = first_run
    out = tmp_path / "grid.png"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    result = subprocess.run([GENTRAIN, "sample", str(workdir / "runs" / "vae-debug"), "--n", "16",
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 samples of vae-debug" in result.stdout
    with Image.open(out) as grid:
        assert grid.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)  # 4x4 tiles of 8x8 digits at 4x
    client, run = the_run(mlflow_server)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples/cli")} == {"samples/cli/grid.png"}


def test_score_writes_per_sample_anomaly_scores(first_run, tmp_path):
    import csv

    workdir, _ = first_run
    out = tmp_path / "scores.csv"
    result = subprocess.run([GENTRAIN, "score", str(workdir / "runs" / "vae-debug"), "builtin:digits",
                             "--split", "test", "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 180  # digits' held-out split
    assert {"key", "label", "neg_elbo", "reconstruction_error"} <= set(rows[0])
    assert all(float(row["neg_elbo"]) > 0 for row in rows)
    assert len({row["key"] for row in rows}) == 180
