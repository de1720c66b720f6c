"""gentrain.tracking against a real MLflow server, including one that is down.

    PYTHONPATH=platform:jobs python -m pytest tests/integration/test_tracking.py -q
"""

from __future__ import annotations

import logging
import math
import time

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from gentrain.tracking import (
    CHANGED_PARAM_TAG, RunLogger, finish_run, log_params_flat, open_run, run_url,
)

FAST_FAIL_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def test_run_params_metrics_and_artifacts_reach_the_server(mlflow_server, tmp_path):
    run_id = open_run(mlflow_server, "tracking-it", "lifecycle", tags={"family": "vae"})
    log_params_flat(mlflow_server, run_id, {"train": {"steps": 10, "lr": 0.001}, "seed": 0})
    samples = tmp_path / "samples.txt"
    samples.write_text("first")

    run_logger = RunLogger(mlflow_server, run_id, spool_dir=tmp_path / "spool")
    for step in range(5):
        run_logger.log_metrics({"loss": 1.0 / (step + 1), "broken": math.nan}, step=step)
    run_logger.log_artifact(samples)
    samples.write_text("overwritten at once")  # the logged copy must keep "first"
    run_logger.log_text("hello", "notes/readme.txt")
    run_logger.set_tag("phase", "train")
    assert run_logger.close(timeout=60) is True

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"train.steps": "10", "train.lr": "0.001", "seed": "0"}
    assert run.data.tags["family"] == "vae" and run.data.tags["phase"] == "train"
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda metric: metric.step)
    assert [metric.step for metric in history] == [0, 1, 2, 3, 4]
    assert [metric.value for metric in history] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert client.get_metric_history(run_id, "broken") == []
    downloaded = download_artifacts(run_id=run_id, artifact_path="", tracking_uri=mlflow_server,
                                    dst_path=str(tmp_path / "downloaded"))
    assert (tmp_path / "downloaded" / "samples.txt").read_text() == "first"
    assert (tmp_path / "downloaded" / "notes" / "readme.txt").read_text() == "hello"
    assert downloaded
    assert not (tmp_path / "spool" / run_id / "pending.jsonl").exists()
    assert run_url(mlflow_server, run_id) == (
        f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run_id}")


def test_open_run_with_its_id_continues_the_same_run(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = open_run(mlflow_server, "tracking-it", "resume")
    log_params_flat(mlflow_server, run_id, {"train": {"steps": 100}})
    finish_run(mlflow_server, run_id, "FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED"

    assert open_run(mlflow_server, "tracking-it", "resume", run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    # Resuming with more steps: params are immutable, so the new value goes to a tag.
    log_params_flat(mlflow_server, run_id, {"train": {"steps": 200}})
    run = client.get_run(run_id)
    assert run.data.params["train.steps"] == "100"
    assert run.data.tags[CHANGED_PARAM_TAG + "train.steps"] == "200"

    finish_run(mlflow_server, run_id, "FAILED")
    assert client.get_run(run_id).info.status == "FAILED"


def test_open_run_with_an_unknown_id_starts_a_new_run(mlflow_server):
    unknown = "0" * 32
    run_id = open_run(mlflow_server, "tracking-it", "fresh", run_id=unknown)
    assert run_id != unknown
    assert MlflowClient(tracking_uri=mlflow_server).get_run(run_id).info.status == "RUNNING"


def test_logging_survives_a_dead_server_and_replays_later(
        mlflow_server, dead_mlflow_uri, tmp_path, monkeypatch, caplog):
    for name in FAST_FAIL_ENV:
        monkeypatch.delenv(name, raising=False)  # RunLogger's own defaults apply, then undone
    run_id = open_run(mlflow_server, "tracking-it", "outage")
    spool_dir = tmp_path / "spool"

    caplog.set_level(logging.WARNING, logger="gentrain.tracking")
    offline = RunLogger(dead_mlflow_uri, run_id, spool_dir=spool_dir)
    started = time.monotonic()
    for step in range(100):
        offline.log_metrics({"loss": float(step)}, step=step)
    assert time.monotonic() - started < 1.0  # enqueued, not sent: generous bound
    assert offline.close(timeout=60) is False
    assert (spool_dir / run_id / "pending.jsonl").exists()
    outage_warnings = [record for record in caplog.records
                       if dead_mlflow_uri in record.getMessage()]
    assert len(outage_warnings) == 1 and outage_warnings[0].exc_info is None

    online = RunLogger(mlflow_server, run_id, spool_dir=spool_dir)
    online.log_metrics({"loss": 100.0}, step=100)
    assert online.close(timeout=60) is True
    history = MlflowClient(tracking_uri=mlflow_server).get_metric_history(run_id, "loss")
    assert sorted(metric.step for metric in history) == list(range(101))
    assert not (spool_dir / run_id / "pending.jsonl").exists()
