"""gentrain.tracking without a server: URIs, flattening, metric filtering (local SQLite)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gentrain.tracking import (
    RunLogger, default_tracking_uri, finish_run, flatten_params, open_run,
    resolve_tracking_uri, run_url,
)


def test_flatten_params_makes_dotted_string_keys():
    nested = {"train": {"steps": 10, "optim": {"lr": 0.001}}, "seed": 0, "tags": [1, 2],
              "empty": {}, "note": None}
    assert flatten_params(nested) == {
        "train.steps": "10", "train.optim.lr": "0.001", "seed": "0", "tags": "[1, 2]",
        "empty": "{}", "note": "None"}


def test_flatten_params_takes_dataclasses_and_cuts_long_values():
    @dataclass
    class Data:
        path: str

    @dataclass
    class Spec:
        data: Data

    flat = flatten_params(Spec(Data("x" * 10_000)))
    assert list(flat) == ["data.path"] and len(flat["data.path"]) == 6000


@pytest.mark.parametrize("uri", ["http://user:secret@mlflow.example:5000",
                                 "https://token@mlflow.example"])
def test_credentials_in_the_uri_are_refused(uri):
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_USERNAME") as raised:
        resolve_tracking_uri(uri)
    assert "secret" not in str(raised.value) and "token@" not in str(raised.value)


def test_credentials_in_the_environment_uri_are_refused_too(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://user:secret@db/mlflow")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI.*PGPASSWORD"):
        resolve_tracking_uri(None)


def test_default_uri_is_an_absolute_sqlite_file_without_the_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert default_tracking_uri() == expected
    assert expected.startswith("sqlite:////")  # four slashes: an absolute path
    assert resolve_tracking_uri(None) == expected
    assert resolve_tracking_uri("  ") == expected


def test_env_uri_is_used_and_the_spec_uri_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == "http://mlflow.example:5000"
    assert resolve_tracking_uri(None) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("http://other:80") == "http://other:80"
    # A relative SQLite file is pinned to this folder: workers run elsewhere.
    assert resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path / 'runs/m.db'}"


def test_finish_run_names_the_allowed_statuses():
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        finish_run("sqlite:///unused.db", "run", "DONE")


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    # One store for the module: creating MLflow's tables takes seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'store' / 'mlflow.db'}"


def test_local_runs_keep_artifacts_beside_the_database(sqlite_uri):
    run_id = open_run(sqlite_uri, "unit", "local")  # also makes the missing store/ folder
    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    database = Path(sqlite_uri[len("sqlite:///"):])
    assert experiment.artifact_location == (database.parent / "mlartifacts").as_uri()
    assert run_url(sqlite_uri, run_id) == (
        f"mlflow ui --backend-store-uri {sqlite_uri}  (run {run_id})")


def test_non_finite_and_non_numeric_metrics_are_dropped_with_one_warning(
        sqlite_uri, tmp_path, caplog):
    run_id = open_run(sqlite_uri, "unit", "metrics")
    caplog.set_level(logging.WARNING, logger="gentrain.tracking")
    run_logger = RunLogger(sqlite_uri, run_id, spool_dir=tmp_path / "spool")
    for step in range(3):
        run_logger.log_metrics({"loss": 0.5, "nan": math.nan, "inf": -math.inf,
                                "text": "x", "../up": 1.0}, step=step)
    assert run_logger.close(timeout=30) is True
    client = MlflowClient(tracking_uri=sqlite_uri)
    assert [metric.step for metric in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    assert client.get_run(run_id).data.metrics == {"loss": 0.5}
    dropped = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert len(dropped) == 4  # once per bad metric, not once per step
    assert not Path(tmp_path / "spool" / run_id / "pending.jsonl").exists()


def test_a_closed_logger_drops_calls_without_raising(sqlite_uri, tmp_path):
    run_logger = RunLogger(sqlite_uri, open_run(sqlite_uri, "unit", "closed"),
                           spool_dir=tmp_path / "spool")
    assert run_logger.close() is True
    run_logger.log_metrics({"loss": 1.0}, step=0)
    run_logger.log_artifact(tmp_path / "missing.txt")
    assert run_logger.flush() is True


def test_a_normal_close_says_nothing_about_spooled_records(sqlite_uri, tmp_path, caplog):
    # close() writes the last records to the spool before sending them: that is no outage.
    caplog.set_level(logging.INFO, logger="gentrain.tracking")
    run_logger = RunLogger(sqlite_uri, open_run(sqlite_uri, "unit", "quiet"), spool_dir=tmp_path / "spool")
    run_logger.log_metrics({"loss": 1.0}, step=0)
    assert run_logger.close(timeout=30) is True
    assert not [record for record in caplog.records if "spooled" in record.getMessage()]
