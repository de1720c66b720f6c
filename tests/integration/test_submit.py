"""`gentrain submit/status/logs/stop/jobs` against a real Ray cluster on loopback (a head
with token auth and a second node, fixture `ray_cluster`) and a real MLflow server.

    .venv/bin/pytest tests/integration/test_submit.py -q

The submitted debug VAE trains with 2 workers, one per node, so this is also the
multi-node run through the whole product path (shared-storage check included).
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

from ports import free_port

pytestmark = pytest.mark.slow
GENTRAIN = str(Path(sys.executable).parent / "gentrain")
ONE_WORKER_PER_NODE = "scaling.resources_per_worker={CPU: 1, gentrain_test_slot: 1}"


def gentrain(*args: str, env: dict, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([GENTRAIN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def client_env(cluster, mlflow_uri: str | None = None, **changes) -> dict:
    """This machine's side: the token in the environment, MLflow's address; no RAY_* else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_ADDRESS=cluster.dashboard_url, RAY_AUTH_TOKEN=cluster.token)
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def job_id_of(output: str) -> str:
    match = re.search(r"as job (gentrain-[\w-]+)", output)
    assert match, output
    return match.group(1)


@pytest.fixture(scope="module")
def followed(ray_cluster, mlflow_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("submit")
    (workdir / "notes.txt").write_text("uploaded with the job\n")
    (workdir / ".venv").mkdir()  # excluded: never uploaded
    result = gentrain("submit", "vae/debug", "train.steps=20", "train.schedule.warmup_steps=2", "train.log_every=10", "eval.every=0",
                      "checkpoint.every=20", "scaling.num_workers=2", ONE_WORKER_PER_NODE,
                      f"storage_path={workdir / 'runs'}", "tracking.experiment=submit-e2e", "--follow",
                      env=client_env(ray_cluster, mlflow_server), cwd=workdir)
    return workdir, result


def test_submit_follows_to_success_and_the_run_is_in_mlflow(followed, mlflow_server):
    workdir, result = followed
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    job_id = job_id_of(out)
    assert "[gentrain] step 20/20" in out  # the followed log of the driver on the cluster
    assert f"  job         : {job_id} (SUCCEEDED)" in out
    run_id = re.search(r"mlflow run  : (\w+) \(experiment submit-e2e\)", out).group(1)
    run = mlflow.MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gentrain.ray_job_id"] == job_id
    assert run.data.tags["gentrain.launcher"] == "ray-job"
    assert run.data.tags["gentrain.world_size"] == "2"
    assert run.data.params["train.steps"] == "20"
    assert run.data.params["scaling.num_workers"] == "2"
    assert (workdir / "runs" / "vae-debug" / "step-00000020" / "gentrain.json").is_file()


def test_status_logs_and_jobs_show_the_finished_job(followed, ray_cluster):
    workdir, result = followed
    job_id = job_id_of(result.stdout)
    env = client_env(ray_cluster)
    status = gentrain("status", job_id, env=env)
    assert status.returncode == 0, status.stderr
    assert f"{job_id} (SUCCEEDED)" in status.stdout
    assert "spec        : vae-debug (vae)" in status.stdout
    assert re.search(r"mlflow run  : \w+ \(experiment submit-e2e\)", status.stdout)
    logs = gentrain("logs", job_id, env=env)
    assert "[gentrain] done: vae-debug" in logs.stdout
    jobs = gentrain("jobs", env=env)
    row = next(line for line in jobs.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "vae-debug" in row


def test_stop_ends_a_running_job_stopped_and_its_run_killed(ray_cluster, mlflow_server, tmp_path):
    env = client_env(ray_cluster, mlflow_server)
    submitted = gentrain("submit", "vae/debug", "train.steps=100000", "scaling.num_workers=1",
                         f"storage_path={tmp_path / 'runs'}", "tracking.experiment=submit-stop",
                         "--wait-timeout=240", env=env, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_of(submitted.stdout)
    assert f"{job_id} (RUNNING)" in submitted.stdout  # default: returns once the MLflow run is open
    run_id = re.search(r"mlflow run  : (\w+)", submitted.stdout).group(1)
    stopped = gentrain("stop", job_id, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"job {job_id} STOPPED" in stopped.stdout
    assert f"{job_id} (STOPPED)" in gentrain("status", job_id, env=env).stdout
    client = mlflow.MlflowClient(mlflow_server)
    deadline = time.monotonic() + 30
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_run(run_id).info.status == "KILLED"


def test_token_from_file_works_and_a_wrong_or_missing_token_is_a_clear_error(ray_cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(ray_cluster.token + "\n")
    from_file = gentrain("jobs", env=client_env(ray_cluster, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=str(token_file)))
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.startswith("JOB")

    wrong = gentrain("jobs", env=client_env(ray_cluster, RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2
    assert f"the Ray cluster at {ray_cluster.dashboard_url} rejected the token read from the environment " \
           "variable RAY_AUTH_TOKEN" in wrong.stderr

    missing = gentrain("status", "some-job", env=client_env(ray_cluster, RAY_AUTH_TOKEN=None, HOME=str(tmp_path)))
    assert missing.returncode == 2
    assert "requires a token and none was found" in missing.stderr
    assert str(tmp_path / ".ray" / "auth_token") in missing.stderr


def test_a_bad_spec_never_reaches_the_cluster(ray_cluster, mlflow_server, tmp_path):
    env = client_env(ray_cluster, mlflow_server)
    before = gentrain("jobs", env=env).stdout.count("\n")
    bad = gentrain("submit", "vae/debug", "train.steps=0", "storage_path=runs", env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "train.steps" in bad.stderr and "storage_path: 'runs' is relative" in bad.stderr
    assert gentrain("jobs", env=env).stdout.count("\n") == before


def test_no_address_or_no_head_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
    spec = ["submit", "vae/debug", f"storage_path={tmp_path}"]
    none = gentrain(*spec, env=env, cwd=tmp_path)
    assert none.returncode == 2 and "no cluster address: pass --address" in none.stderr
    address = f"http://127.0.0.1:{free_port()}"
    refused = gentrain(*spec, "--address", address, env=env, cwd=tmp_path)
    assert refused.returncode == 2
    assert f"cannot reach the Ray Jobs API at {address}" in refused.stderr and "ray start --head" in refused.stderr


@pytest.mark.full_matrix  # about 75 s on a loaded 2-core machine: run with --full-matrix
def test_a_sweep_runs_on_the_cluster_as_one_job_with_a_trial_on_each_node(ray_cluster, mlflow_server, tmp_path):
    """`gentrain sweep --address`: the sweep's driver is the job; each trial's one worker
    needs a node's only gentrain_test_slot, so the two trials run at once, one per node."""
    result = gentrain("sweep", "vae/debug", "train.steps=10", "train.schedule.warmup_steps=0",
                      "train.log_every=10", "eval.every=5", "eval.max_batches=2", "eval.num_samples=8",
                      "checkpoint.every=10", "scaling.num_workers=1", ONE_WORKER_PER_NODE,
                      f"storage_path={tmp_path / 'runs'}", "tracking.experiment=sweep-cluster",
                      "--param", "train.optimizer.lr=grid(3e-3,1e-3)", "--metric", "eval/elbo", "--mode", "max",
                      "--scheduler", "fifo", "--name", "on-cluster", "--follow", "--address", ray_cluster.dashboard_url,
                      env=client_env(ray_cluster, mlflow_server), cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "2 trial(s) of 1 param(s), 2 at once (each: 1 CPU, 1 gentrain_test_slot)" in out
    assert "sweep on-cluster done" in out and out.count("completed at step 10/10") == 2
    parent_id = re.search(r"parent run  : (\w+) \(experiment sweep-cluster\)", out).group(1)
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(run.info.status for run in children) == ["FINISHED", "FINISHED"]
    assert (tmp_path / "runs" / "on-cluster" / "best.yaml").is_file()
