"""End to end: a classifier and a VAE trained on a real embedded Ray (the VAE with periodic FID/KID under
the classifier, tracked in a real MLflow server), then `gentrain eval` logs into the VAE's MLflow run;
sampling and extraction split over Ray tasks give the single-process numbers.

    .venv/bin/pytest tests/integration/test_eval.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray

from gentrain.cli import main
from gentrain.evaluation.distributed import ExtractorChoice, GeneratedWork, summarize
from gentrain.evaluation.work import generated_units
from gentrain.launch.local import run
from gentrain.validation import load_job

pytestmark = pytest.mark.slow
GENTRAIN = str(Path(sys.executable).parent / "gentrain")
LABEL = "classifier-classifier-debug"
COMMON = ["scaling.num_workers=1", "eval.every=0", "train.log_every=10", "train.schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_server):
    storage = tmp_path_factory.mktemp("eval-runs")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        run(load_job("classifier/debug", COMMON + [f"storage_path={storage}", "train.steps=60",
                                                    "checkpoint.every=60", "tracking.enabled=false"]))
        classifier = storage / "classifier-debug"
        vae = run(load_job("vae/debug", COMMON + [
            f"storage_path={storage}", "train.steps=20", "checkpoint.every=20", f"tracking.uri={mlflow_server}",
            "tracking.experiment=eval-e2e", "eval.metrics=[fid,kid]", f"eval.extractor=classifier:{classifier}",
            "eval.fid_samples=200", "eval.sample_batch_size=100"]))
        yield classifier, Path(vae.checkpoint), vae.mlflow_run_id
    finally:
        ray.shutdown()


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_training_logs_periodic_fid_and_kid_under_the_classifier(runs, mlflow_server):
    _, _, run_id = runs
    client = mlflow.MlflowClient(mlflow_server)
    fid = history(client, run_id, f"eval/{LABEL}/fid")
    assert [step for step, _ in fid] == [0, 20] and all(value > 0 for _, value in fid)
    assert len(history(client, run_id, f"eval/{LABEL}/kid")) == 2
    references = [a.path for a in client.list_artifacts(run_id, "eval/reference")]
    assert len(references) == 1 and references[0].endswith(".npz")


def test_gentrain_eval_logs_metrics_and_report_into_the_run(runs, mlflow_server, tmp_path):
    classifier, checkpoint, run_id = runs
    out = tmp_path / "report.json"
    result = subprocess.run([GENTRAIN, "eval", str(checkpoint.parent), "--metrics", "fid,kid,is,pr,nll", "--n", "300",
                             "--extractor", f"classifier:{classifier}", "--out", str(out)],
                            env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    samples = report["samples"]
    assert samples["extractor"].startswith("classifier:classifier-debug@step-00000060#")
    assert samples["num_fake"] == 300 and samples["num_real"] == 300
    assert samples["fid"] > 0 and 1.0 <= samples["is"] <= 10.0 and 0.0 <= samples["precision"] <= 1.0
    assert set(report["likelihood"]["metrics"]) >= {"elbo", "nll_bits_per_dim"}
    assert report["likelihood"]["units"] == {"elbo": "nats", "iwae": "nats", "nelbo_bits_per_dim": "bits/dim",
                                             "nll_bits_per_dim": "bits/dim"}  # as the VAE declares them
    client = mlflow.MlflowClient(mlflow_server)
    assert (20, samples["fid"]) in history(client, run_id, f"eval/{LABEL}/fid")  # at the checkpoint's step
    assert history(client, run_id, "eval/test/nll_bits_per_dim") == [(20, report["likelihood"]["metrics"]
                                                                        ["nll_bits_per_dim"])]
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert "eval/report-step-00000020.json" in logged
    assert client.get_run(run_id).data.tags[f"gentrain.extractor.{LABEL}"] == samples["extractor"]


def test_metrics_a_job_type_cannot_provide_are_a_clear_error(runs, capsys):
    classifier, _, _ = runs
    assert main(["eval", str(classifier), "--metrics", "fid,nll"]) == 2
    error = capsys.readouterr().err
    assert "job type 'classifier' cannot provide fid, nll" in error and "it can provide: heldout" in error


def test_sampling_and_extraction_over_ray_tasks_equal_one_process(runs):
    classifier, checkpoint, _ = runs
    choice = ExtractorChoice(f"classifier:{classifier}", None, (1, 8, 8))
    work = GeneratedWork(str(checkpoint), True, seed=3, total=230)
    units = generated_units(230, 50)
    single = summarize(work, choice, units, workers=1)
    spread = summarize(work, choice, units, workers=2)  # Ray is up: 2 tasks, units 0,2,4 and 1,3
    assert single.count == spread.count == 230
    for ours, theirs in zip(single.statistics.statistics(), spread.statistics.statistics()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(single.kept_features(), spread.kept_features(), rtol=1e-6, atol=1e-6)
    assert single.inception_score().mean == pytest.approx(spread.inception_score().mean, rel=1e-9)
