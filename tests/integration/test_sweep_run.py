"""End to end: `gentrain sweep` of the debug VAE on CPU, four trials of one worker each, two
at once, tracked in a real MLflow server.

The grid is ordered so the outcome does not hang on timing: the good learning rate starts
first and has reached each ASHA rung before the tiny ones get there (they start after the
1e30 trial, which passes validation and fails at its second step with a non-finite loss
under train.nonfinite=stop), so ASHA stops at least the first tiny one at its first rung.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 30
GOOD, HUGE, TINY = 3e-3, 1e30, (1e-6, 2e-6)


def gentrain(workdir: Path, tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    paths = [str(ROOT / "platform"), str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    return subprocess.run([sys.executable, "-m", "gentrain.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_server):
    workdir = tmp_path_factory.mktemp("sweep")
    started = time.monotonic()
    result = gentrain(
        workdir, mlflow_server, "sweep", "vae/debug", f"storage_path={workdir / 'runs'}",
        "tracking.experiment=sweep", f"train.steps={STEPS}", "scaling.num_workers=1",
        "train.schedule.warmup_steps=0", "train.log_every=10", "eval.every=10", "eval.max_batches=2",
        "eval.num_samples=8", f"checkpoint.every={STEPS}",
        "--param", f"train.optimizer.lr=grid({GOOD},{HUGE},{TINY[0]},{TINY[1]})",
        "--metric", "eval/elbo", "--mode", "max", "--max-concurrent", "2", "--name", "lr")
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise AssertionError(f"gentrain sweep failed ({result.returncode}):\n"
                             f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    print(f"sweep took {seconds:.0f} s")
    return workdir, result


def rows(workdir: Path) -> dict[float, dict]:
    with open(workdir / "runs" / "lr" / "results.csv", newline="") as handle:
        return {float(row["train.optimizer.lr"]): row for row in csv.DictReader(handle)}


def test_asha_stops_a_worse_trial_the_best_completes_and_a_failure_is_only_its_own(sweep):
    workdir, result = sweep
    table = rows(workdir)
    assert sorted(table) == sorted([GOOD, HUGE, *TINY])
    assert (table[GOOD]["status"], int(table[GOOD]["steps"])) == ("completed", STEPS)
    assert table[HUGE]["status"] == "failed" and "NonFiniteError" in table[HUGE]["error"]
    stopped = [lr for lr in TINY if table[lr]["status"] == "stopped early"]
    assert TINY[0] in stopped and all(int(table[lr]["steps"]) < STEPS for lr in stopped)
    assert float(table[GOOD]["eval/elbo"]) > max(float(table[lr]["eval/elbo"]) for lr in TINY)
    # every trial trained in <storage_path>/<sweep>/<trial id>
    for row in table.values():
        assert (workdir / "runs" / "lr" / row["trial"]).is_dir()
    assert (workdir / "runs" / "lr" / table[GOOD]["trial"] / f"step-{STEPS:08d}").is_dir()
    out = result.stdout
    assert "4 trial(s) of 1 param(s), 2 at once (each: 1 CPU)" in out
    assert f"best trial  : {table[GOOD]['trial']}" in out and "stopped early" in out and "failed" in out


def test_mlflow_holds_a_parent_run_and_one_child_per_trial_with_params_and_status(sweep, mlflow_server):
    workdir, _ = sweep
    table = rows(workdir)
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("gentrain.sweep.role") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "lr"
    assert parent.data.params["space.train.optimizer.lr"] == f"grid({GOOD},{HUGE},{TINY[0]},{TINY[1]})"
    assert parent.data.params["sweep.metric"] == "eval/elbo" and parent.data.params["sweep.mode"] == "max"
    assert parent.data.tags["gentrain.sweep.best_trial"] == table[GOOD]["trial"]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/results.md", "sweep/best.yaml", "sweep/space.yaml"} <= artifacts

    children = {run.data.tags["gentrain.sweep.trial"]: run for run in runs if run is not parent
                and run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(row["trial"] for row in table.values())
    expected = {"completed": ("FINISHED", "completed"), "stopped early": ("KILLED", "stopped_early"),
                "failed": ("FAILED", "failed")}
    for lr, row in table.items():
        child = children[row["trial"]]
        assert float(child.data.params["train.optimizer.lr"]) == lr  # the resolved spec, as `run` logs it
        assert child.data.params["name"] == row["trial"]
        assert (child.info.status, child.data.tags["gentrain.sweep.outcome"]) == expected[row["status"]]
        if row["status"] == "completed":  # it ended by itself, as `gentrain run` does: its model
            # logged (Tune's ASHA would stop it at its last evaluation, before that)
            assert [output.step for output in child.outputs.model_outputs] == [STEPS]
            assert child.data.metrics["run/attempt_seconds"] > 0
        if row["status"] != "failed":  # the evaluation that ranked it reached its run (a stopped
            # trial may have evaluated once more before its workers were ended)
            history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "eval/elbo")}
            assert history[int(row["steps"])] == pytest.approx(float(row["eval/elbo"]))


def test_the_best_spec_is_written_out_and_runs_through_validation(sweep):
    from gentrain.cli import main

    workdir, result = sweep
    best = workdir / "runs" / "lr" / "best.yaml"
    assert f"best spec   : {best}" in result.stdout and f"gentrain run {best}" in result.stdout
    assert main(["validate", str(best)]) == 0
    from gentrain.spec import read_yaml

    data = read_yaml(best)
    assert data["train"]["optimizer"]["lr"] == GOOD and data["name"] == "lr-best"
    assert data["train"]["steps"] == STEPS and data["scaling"]["num_workers"] == 1


def test_the_best_spec_runs_and_trains_the_best_trial_again(sweep, mlflow_server):
    """`gentrain run best.yaml`, the command the sweep prints: the same training as the best
    trial (same seed, one worker), so the same eval/elbo at the end."""
    workdir, _ = sweep
    trained = gentrain(workdir, mlflow_server, "run", str(workdir / "runs" / "lr" / "best.yaml"))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (workdir / "runs" / "lr-best" / f"step-{STEPS:08d}").is_dir()
    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                filter_string="attributes.run_name = 'lr-best'")
    history = {point.step: point.value for point in client.get_metric_history(run.info.run_id, "eval/elbo")}
    assert history[STEPS] == pytest.approx(float(rows(workdir)[GOOD]["eval/elbo"]), rel=1e-4)


def test_an_interrupted_sweep_resumes_where_it_stopped_in_the_same_mlflow_runs(tmp_path, mlflow_server):
    """Ctrl-C while the second of two trials trains (one at a time): exit 130, the table and
    the `--resume` command; that command finishes the sweep without rerunning the first
    trial, the second in its own MLflow run (from its checkpoint when it had one), under
    the same parent."""
    import re
    import signal
    import threading

    paths = [str(ROOT / "platform"), str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    command = [sys.executable, "-m", "gentrain.cli", "sweep", "vae/debug", f"storage_path={tmp_path / 'runs'}",
               "tracking.experiment=sweep-resume", "train.steps=60", "scaling.num_workers=1",
               "train.schedule.warmup_steps=0", "train.log_every=10", "eval.every=30", "eval.max_batches=2",
               "eval.num_samples=8", "checkpoint.every=30", "--param", "train.optimizer.lr=grid(3e-3,1e-3)",
               "--metric", "eval/elbo", "--mode", "max", "--scheduler", "fifo", "--max-concurrent", "1",
               "--name", "resumable"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    second_evaluated = threading.Event()

    def read() -> None:
        second = None
        for line in process.stdout:
            lines.append(line)
            started = re.search(r"trial (\w+) started", line)
            if started and "completed at step" in "".join(lines):
                second = started[1]
            if second and "eval at step 30" in line:
                second_evaluated.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert second_evaluated.wait(timeout=480), "".join(lines)[-5000:]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=180) == 130, "".join(lines)[-5000:]
    reader.join(timeout=30)
    first_out = "".join(lines)
    first, second = re.findall(r"trial (\w+) started", first_out)
    assert re.search(rf"{second} .* interrupted", first_out) and "--resume" in first_out
    # The newest checkpoint the second trial left: step 30, or step 60 where it trained to
    # the end before Tune stopped it (a slow machine; its final evaluation is then made again).
    from gentrain.checkpoint import newest_good_checkpoint

    newest = newest_good_checkpoint(str(tmp_path / "runs" / "resumable" / second))
    had_checkpoint = int(newest.meta["step"]) if newest.folder else 0

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-5000:]
    assert f"trial {first} started" not in out and f"trial {second} started" in out, out[-5000:]
    assert f"trial {second} completed at step 60/60" in out and "2 trials (2 completed)" in out, (
        first_out[-3000:] + "\n----- the resumed sweep -----\n" + out[-6000:])
    if had_checkpoint:
        assert f"continuing {second} from step {had_checkpoint}" in out, out[-5000:]
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-resume").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("gentrain.sweep.role") == "parent"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted((run.data.tags["gentrain.sweep.trial"], run.info.status) for run in children) == sorted(
        [(first, "FINISHED"), (second, "FINISHED")])
    (second_run,) = [run for run in children if run.data.tags["gentrain.sweep.trial"] == second]
    assert second_run.data.tags["gentrain.attempts"] == "2"
