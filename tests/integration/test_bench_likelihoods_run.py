"""`gentrain bench likelihoods` end to end with a tiny budget: PixelCNN, the VAE and RealNVP
each trained by `gentrain run` (embedded Ray, 1 worker) on the same binarized MNIST-5k,
then `gentrain eval --metrics nll` on each; one table, one JSON file and one MLflow run of
the gentrain-bench experiment. What the numbers reach is a benchmark, not tested; that
every family's row is its own run's held-out likelihood in nats per binary image is.

    .venv/bin/python -m pytest -q tests/integration/test_bench_likelihoods_run.py
"""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import ray

from gentrain.bench.likelihoods import run_likelihood_bench

pytestmark = pytest.mark.slow


def test_bench_likelihoods_trains_three_families_and_tables_their_eval_nll(tmp_path, capsys):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage, json_path = tmp_path / "bench", tmp_path / "bench.json"
    try:
        result = run_likelihood_bench(budget="2s", workers=1, storage=str(storage), tracking_uri=tracking,
                                      overrides=["vae:job.config.iwae_samples=8"], eval_batches=1,
                                      json_path=str(json_path))
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    rows = {r["family"]: r for r in result["rows"]}
    assert list(rows) == ["pixelcnn", "vae", "realnvp"]
    for family, row in rows.items():
        assert row["stopped_at_time_budget"] and row["steps"] >= 1, family
        assert (row["unit"], row["split"]) == ("nats", "test")
        assert 0 < row["nll_nats"] < 2 * 784 * math.log(2)  # nats per 28x28 binary image (uniform: 543)
        # the row is the family's `gentrain eval --metrics nll` report, read back from its --out
        report = json.loads((storage / f"bench-{family}-eval.json").read_text())["likelihood"]
        assert report["num_samples"] == row["num_samples"] > 0
        if family == "vae":
            assert row["nll_nats"] == pytest.approx(-report["metrics"]["iwae"])
            assert row["measure"] == "-IWAE (k=8)" and row["kind"] == "bound"
            assert row["nll_nats"] <= row["neg_elbo_nats"]  # IWAE's bound is the tighter one
        else:
            assert row["nll_nats"] == pytest.approx(report["metrics"]["nll"]) and row["kind"] == "exact"
            assert report["units"] == {"nll": "nats", "bits_per_dim": "bits/dim"}
            assert report["metrics"]["nll"] == pytest.approx(report["metrics"]["bits_per_dim"] * 784 * math.log(2),
                                                             rel=1e-5)
    # one table on stdout, the same rows in the JSON file and in the bench's MLflow run
    assert "family     steps  run s  measure            nats  kind      -ELBO" in out
    for family, row in rows.items():
        assert f"{row['nll_nats']:8.2f}" in out
    assert json.loads(json_path.read_text())["rows"] == result["rows"]
    client = mlflow.MlflowClient(tracking)
    bench_run = client.get_run(result["mlflow_run_id"])
    assert client.get_experiment(bench_run.info.experiment_id).name == "gentrain-bench"
    # its artifacts beside the database, as `gentrain run`'s are (not in ./mlruns of the cwd)
    assert bench_run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert {a.path for a in client.list_artifacts(bench_run.info.run_id)} == {"likelihoods.txt", "likelihoods.json"}
    for family, row in rows.items():
        assert bench_run.data.metrics[f"{family}/nll_nats"] == pytest.approx(row["nll_nats"])
