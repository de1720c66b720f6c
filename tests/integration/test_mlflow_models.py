"""What MLflow users reach for, against a real MLflow server: the experiment's
model-training view, dataset inputs, system metrics (also while the server is away), and
the trained model logged at the end of `gentrain run`, loaded in a fresh process through
MLflow's own API and drawing what `gentrain sample` draws.

    PYTHONPATH=platform:jobs python -m pytest tests/integration/test_mlflow_models.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from gentrain.data.index import default_cache_dir, load_index, resolve_builtin
from gentrain.tracking import RunLogger, open_run, using_tracking_uri
from gentrain.tracking.lineage import (
    EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, git_state, log_datasets,
)
from gentrain.tracking.system import SystemMetrics
from gentrain.validation import load_spec

GENTRAIN = str(Path(sys.executable).parent / "gentrain")
ROOT = Path(__file__).resolve().parents[2]


def test_experiments_gentrain_creates_open_in_the_model_training_view(mlflow_server):
    client = MlflowClient(mlflow_server)
    run_id = open_run(mlflow_server, "view-new", "a")
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    # An experiment made elsewhere gets the tag at gentrain's first run in it...
    untagged = client.create_experiment("view-untagged")
    open_run(mlflow_server, "view-untagged", "a")
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    # ...but a view someone chose (the UI's switch sets the same tag) is kept.
    chosen = client.create_experiment("view-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    open_run(mlflow_server, "view-chosen", "a")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_splits_are_logged_as_dataset_inputs_once_per_run(mlflow_server):
    client = MlflowClient(mlflow_server)
    spec = load_spec("vae/debug")
    index = load_index(resolve_builtin("builtin:digits", default_cache_dir()))
    run_id = open_run(mlflow_server, "lineage", "a")
    assert log_datasets(client, run_id, spec, index) == 2
    assert log_datasets(client, run_id, spec, index) == 0  # a rerun of the same run
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert sorted((item.dataset.name, item.dataset.digest, item.tags[0].value) for item in inputs) == [
        ("digits/test", index.content_hash.split(":")[-1][:36], "evaluation"),
        ("digits/train", index.content_hash.split(":")[-1][:36], "training")]


def test_system_metrics_reach_the_run_and_survive_an_outage(mlflow_server, dead_mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_server)
    run_id = open_run(mlflow_server, "system-metrics", "a")
    origin_ms = client.get_run(run_id).info.start_time
    spool = tmp_path / "spool"
    # The server away: sampling and stopping never wait on it; the points are spooled.
    offline = RunLogger(dead_mlflow_uri, run_id, spool_dir=spool)
    started = time.monotonic()
    monitor = SystemMetrics(offline, interval_s=0.3, origin_ms=origin_ms).start()
    time.sleep(1.0)
    monitor.stop()
    assert time.monotonic() - started < 5.0
    assert offline.close(timeout=30) is False
    assert (spool / run_id / "pending.jsonl").exists()
    # Back: the next logger sends the spooled points first, then its own.
    online = RunLogger(mlflow_server, run_id, spool_dir=spool)
    monitor = SystemMetrics(online, interval_s=0.3, origin_ms=origin_ms).start()
    time.sleep(1.0)
    monitor.stop()
    assert online.close(timeout=30) is True
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    steps = [point.step for point in sorted(cpu, key=lambda point: point.timestamp)]
    assert len(steps) >= 4 and steps == sorted(set(steps))  # seconds since the run started
    assert all(0 <= point.value <= 100 for point in cpu)
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert memory and all(point.value > 0 for point in memory)


def run_command(workdir: Path, *extra: str) -> list[str]:
    return [GENTRAIN, "run", "vae/debug", f"storage_path={workdir / 'runs'}", "train.schedule.warmup_steps=0",
            "train.log_every=3", "checkpoint.every=6", "eval.every=0", "eval.num_samples=4",
            "scaling.num_workers=1", "tracking.experiment=models-e2e", "tracking.system_metrics_interval=1",
            "tracking.register_model=vae-e2e", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_server):
    """One tiny `gentrain run`, on one worker, that logs and registers its model."""
    workdir = tmp_path_factory.mktemp("mlflow-model")
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    started = time.monotonic()
    result = subprocess.run(run_command(workdir, "train.steps=6"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("models-e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    print("".join(line for line in result.stdout.splitlines(keepends=True) if "mlflow model:" in line))
    return workdir, run, result.stdout, time.monotonic() - started


@pytest.mark.slow
def test_a_run_carries_its_tags_data_and_system_metrics(trained, mlflow_server):
    _, run, _, _ = trained
    tags = run.data.tags
    assert tags["gentrain.job_type"] == "vae" and tags["gentrain.strategy"] == "ddp"
    assert tags["gentrain.world_size"] == "1" and tags["gentrain.launcher"] == "local"
    assert tags["gentrain.precision"] == "fp32" and tags["gentrain.version"]
    assert tags["gentrain.attempts"] == "1"
    state = git_state(ROOT)
    if state is not None:  # CI may test a copy without .git
        assert tags["mlflow.source.git.commit"] == state[0]
    contexts = {item.tags[0].value: item.dataset.name for item in run.inputs.dataset_inputs}
    assert contexts == {"training": "digits/train", "evaluation": "digits/test"}
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.metrics["run/attempt_seconds"] > 0
    client = MlflowClient(mlflow_server)
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


@pytest.mark.slow
def test_the_logged_model_draws_what_gentrain_sample_draws(trained, mlflow_server, tmp_path):
    workdir, run, stdout, _ = trained
    assert "[gentrain] mlflow model: models:/m-" in stdout
    (output,) = run.outputs.model_outputs
    model = MlflowClient(mlflow_server).get_logged_model(output.model_id)
    assert model.source_run_id == run.info.run_id and model.experiment_id == run.info.experiment_id
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    # A fresh process, MLflow's API only; no Ray or DeepSpeed gets imported to load it.
    script = (
        "import sys, mlflow, numpy as np\n"
        "for uri, out in ((sys.argv[1], sys.argv[3]), (sys.argv[2], sys.argv[4])):\n"
        "    model = mlflow.pyfunc.load_model(uri)\n"
        "    np.save(out, model.predict({'n': 6, 'seed': 3}))\n"
        "import pandas as pd\n"
        "data = np.linspace(0, 1, 3 * 64).reshape(3, 64)\n"  # three 8x8 digits, flattened
        "model.predict(pd.DataFrame({'data': list(data)})).to_csv(sys.argv[4] + '.csv', index=False)\n"
        "assert not {'ray', 'deepspeed', 'accelerate'} & set(sys.modules), 'training stack imported'\n"
        "print(model.metadata.signature.inputs.input_names())\n")
    loaded = subprocess.run([sys.executable, "-c", script, "models:/vae-e2e/1",
                             f"runs:/{run.info.run_id}/model", str(tmp_path / "registered.npy"),
                             str(tmp_path / "from-run.npy")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "['n', 'seed', 'data']" in loaded.stdout
    # `gentrain sample` and `gentrain eval` take the model's URI too; `sample` draws the same
    # grid. Both log to the model's run on the server $MLFLOW_TRACKING_URI names (not to a
    # ./mlflow.db of the folder they run in).
    from_uri = subprocess.run([GENTRAIN, "sample", "models:/vae-e2e/1", "--n", "6", "--seed", "3",
                               "--out", str(tmp_path / "cli-uri.png")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert from_uri.returncode == 0, from_uri.stderr[-3000:]
    assert f"logged to MLflow run {run.info.run_id} (samples/cli/)" in from_uri.stdout, from_uri.stderr[-3000:]
    evaluated = subprocess.run([GENTRAIN, "eval", "models:/vae-e2e/1", "--metrics", "nll"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"to MLflow run {run.info.run_id} (eval/)" in evaluated.stderr, evaluated.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(mlflow_server)
    assert [item.path for item in client.list_artifacts(run.info.run_id, "samples/cli")] == ["samples/cli/cli-uri.png"]
    assert [point.step for point in client.get_metric_history(run.info.run_id, "eval/test/elbo")] == [6]
    assert "eval/report-step-00000006.json" in {item.path for item in client.list_artifacts(run.info.run_id, "eval")}

    import numpy as np

    from gentrain.inference import load_trained
    from gentrain.visual import save_samples

    # What `gentrain sample <run folder> --n 6 --seed 3` draws (its cmd_sample calls this).
    run_folder = load_trained(str(workdir / "runs" / "vae-debug"))
    expected = run_folder.sample(6, seed=3)
    save_samples(expected, tmp_path / "cli.png", run_folder.data_info)
    for name in ("registered", "from-run"):
        drawn = np.load(tmp_path / f"{name}.npy")
        assert drawn.shape == (6, 1, 8, 8) and np.array_equal(drawn, expected.numpy())
    assert (tmp_path / "cli-uri.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    # The VAE has `score`: rows of data give its per-sample scores (what `gentrain score` writes).
    import pandas as pd
    import torch

    scored = pd.read_csv(tmp_path / "from-run.npy.csv")
    data = torch.linspace(0, 1, 3 * 64, dtype=torch.float64).reshape(3, 1, 8, 8).float()
    direct = run_folder.job.score(run_folder.modules, run_folder.config, {"image": data})
    assert sorted(scored.columns) == sorted(direct)
    for name, values in direct.items():
        assert np.allclose(scored[name].to_numpy(), values.numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_the_server_missed_is_logged_by_sync(mlflow_server, dead_mlflow_uri, tmp_path, capsys,
                                                    monkeypatch):
    import numpy as np

    import gentrain
    from gentrain.inference import load_trained
    from gentrain.launch.local import prepare_data
    from gentrain.tracking import spool_dir_for, spooled_runs, sync_run
    from gentrain.tracking.model import log_trained_model

    spec = prepare_data(gentrain.load("vae/debug", [
        "train.steps=2", "train.schedule.warmup_steps=0", "checkpoint.every=2", "eval.every=0",
        "eval.max_batches=1", "eval.num_samples=2", "scaling.num_workers=1",
        f"storage_path={tmp_path / 'runs'}", "tracking.register_model=vae-synced"]))
    gentrain.Engine(spec).fit()
    run_id = open_run(mlflow_server, "model-sync", "a")
    assert log_trained_model(dead_mlflow_uri, run_id, spec) is None
    assert f"gentrain sync {spec.run_dir}" in capsys.readouterr().err
    spool = spool_dir_for(spec.run_dir)
    assert spooled_runs(spool) == [run_id]

    # As `gentrain sync` / `sample` / `eval` run: the server named by the environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    ending = sync_run(mlflow_server, run_id, spool)
    assert ending.marked and ending.sent == 1
    assert spooled_runs(spool) == []
    client = MlflowClient(mlflow_server)
    (output,) = client.get_run(run_id).outputs.model_outputs
    assert output.step == 2
    (version,) = client.search_model_versions("name='vae-synced'")
    with using_tracking_uri(mlflow_server):
        model = mlflow.pyfunc.load_model(f"models:/vae-synced/{version.version}")
    expected = load_trained(spec.run_dir).sample(2, seed=1).numpy()
    assert np.array_equal(model.predict({"n": 2, "seed": 1}), expected)
    # Logging the model and loading it by its URI leave $MLFLOW_TRACKING_URI as it was (MLflow's
    # _use_tracking_uri unsets it): the run that `sample`/`eval` then log to is on that server.
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server
    from_uri = load_trained(f"models:/vae-synced/{version.version}")
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server
    assert np.array_equal(from_uri.sample(2, seed=1).numpy(), expected)


@pytest.mark.slow
def test_a_rerun_counts_its_attempt_and_the_switches_turn_system_metrics_and_the_model_off(trained, mlflow_server):
    """The fixture's run trained on to step 12 by the same command (train.steps raised), with
    tracking.system_metrics=false and tracking.log_model=false: the same MLflow run, attempt 2,
    the trained wall time summed over both attempts, no system metric point and no model from
    this attempt."""
    workdir, first, _, _ = trained
    client = MlflowClient(mlflow_server)
    rerun_started_ms = int(time.time() * 1000)
    result = subprocess.run(run_command(workdir, "train.steps=12", "tracking.system_metrics=false",
                                        "tracking.log_model=false"),
                            cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert f"in MLflow run {first.info.run_id}" in result.stdout
    run = client.get_run(first.info.run_id)
    assert run.data.tags["gentrain.attempts"] == "2"
    attempts = sorted((point.step, point.value) for point in
                      client.get_metric_history(run.info.run_id, "run/attempt_seconds"))
    assert [step for step, _ in attempts] == [1, 2] and all(seconds > 0 for _, seconds in attempts)
    (total,) = [point for point in client.get_metric_history(run.info.run_id, "run/wall_seconds_total")
                if point.step == 2]
    assert total.value == pytest.approx(sum(seconds for _, seconds in attempts), rel=1e-6)
    # MLflow's duration spans both attempts and the time between them.
    assert (run.info.end_time - run.info.start_time) / 1000 > total.value
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(point.timestamp < rerun_started_ms for point in cpu)
    assert [output.step for output in run.outputs.model_outputs] == [6]
    assert "mlflow model:" not in result.stdout
    assert len(client.search_model_versions("name='vae-e2e'")) == 1


@pytest.mark.slow
def test_every_checkpoint_becomes_a_model_on_request(tmp_path, mlflow_server):
    """tracking.log_model_checkpoints=true: each checkpoint before the last is logged by rank 0
    as a model of the run at its step, in the background; the last is the driver's model at
    the end, the only one registered."""
    result = subprocess.run(run_command(tmp_path, "train.steps=9", "checkpoint.every=3",
                                        "tracking.experiment=ckpt-models", "tracking.register_model=vae-ckpt",
                                        "tracking.log_model_checkpoints=true"),
                            cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("ckpt-models").experiment_id])
    assert sorted(output.step for output in run.outputs.model_outputs) == [3, 6, 9]
    assert len(client.search_model_versions("name='vae-ckpt'")) == 1
    early = next(output for output in run.outputs.model_outputs if output.step == 3)
    assert client.get_logged_model(early.model_id).tags["gentrain.step"] == "3"
    with using_tracking_uri(mlflow_server):
        assert mlflow.pyfunc.load_model("models:/vae-ckpt/1").metadata.metadata["gentrain_step"] == 9
        images = mlflow.pyfunc.load_model(f"models:/{early.model_id}").predict({"n": 2, "seed": 0})
    assert len(images) == 2
