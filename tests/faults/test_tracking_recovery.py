"""Tracking through faults, without Ray: the spool retried while the run goes on, the
repeat rule after a restart, and a run's end bounded while the server is away.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_tracking_recovery.py -q
"""

from __future__ import annotations

import logging
import time

from mlflow import MlflowClient

from gentrain.tracking import RunLogger, end_run, open_run, spooled_runs, sync_run
from gentrain.tracking import logger as logger_module
from ports import free_port


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((metric.step, metric.value) for metric in points)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.2)


def test_spooled_records_are_sent_while_the_run_goes_on(restartable_mlflow, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(logger_module, "_RETRY_MAX_S", 2.0)  # retry every 2 s, not every 30 s
    caplog.set_level(logging.WARNING, logger="gentrain.tracking")
    uri = restartable_mlflow.uri
    run_id = open_run(uri, "faults-spool-retry", "spool-retry")
    restartable_mlflow.stop()
    run_logger = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    pending = tmp_path / "spool" / run_id / "pending.jsonl"
    for step in range(10):
        run_logger.log_metrics({"train/loss": float(step)}, step=step)
    wait_for(pending.exists, 30, "the spool")
    # The console line says why in a few words, not urllib3's retry state cut mid-sentence.
    [away] = [record.getMessage() for record in caplog.records if "unreachable" in record.getMessage()]
    assert away.startswith(f"MLflow at {uri} unreachable (connection refused); training goes on"), away
    assert "HTTPConnectionPool" not in away, away

    restartable_mlflow.start()
    # No flush and no close: the background thread retries the spool on its own.
    wait_for(lambda: not pending.exists(), 30, "the spool sent")
    assert [step for step, _ in history(uri, run_id, "train/loss")] == list(range(10))
    assert run_logger.close(timeout=30) is True


def test_a_restarted_attempt_logs_only_steps_above_those_already_logged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "faults", "repeats")
    spool = tmp_path / "spool"
    first = RunLogger(uri, run_id, spool_dir=spool)
    for step in (25, 50, 75):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"eval/loss": 1.0}, step=50)
    assert first.close(timeout=30) is True

    # Resumed from a checkpoint at step 50: steps 75 (train) and 50 (eval) come again.
    restarted = RunLogger(uri, run_id, spool_dir=spool)
    for step in (75, 100):
        restarted.log_metrics({"train/loss": -float(step)}, step=step)
    restarted.log_metrics({"eval/loss": 2.0}, step=50)
    restarted.log_metrics({"eval/loss": 3.0}, step=100)
    assert restarted.close(timeout=30) is True

    assert history(uri, run_id, "train/loss") == [(25, 25.0), (50, 50.0), (75, 75.0), (100, -100.0)]
    assert history(uri, run_id, "eval/loss") == [(50, 1.0), (100, 3.0)]


def test_spooled_steps_count_as_logged_for_the_next_attempt(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "faults", "spooled-repeats")
    spool = tmp_path / "spool"
    offline = RunLogger(f"http://127.0.0.1:{free_port()}", run_id, spool_dir=spool)
    for step in (10, 20, 30):
        offline.log_metrics({"train/loss": float(step)}, step=step)
    assert offline.close(timeout=30) is False  # all of it waits in the spool

    restarted = RunLogger(uri, run_id, spool_dir=spool)
    for step in (20, 30, 40):
        restarted.log_metrics({"train/loss": -float(step)}, step=step)
    assert restarted.close(timeout=30) is True
    assert history(uri, run_id, "train/loss") == [(10, 10.0), (20, 20.0), (30, 30.0), (40, -40.0)]


def test_a_run_ended_while_the_server_is_away_is_marked_by_the_sync(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dead = f"http://127.0.0.1:{free_port()}"
    run_id = open_run(uri, "faults", "ending")
    spool = tmp_path / "spool"
    offline = RunLogger(dead, run_id, spool_dir=spool)
    offline.log_metrics({"train/loss": 0.5}, step=1)
    offline.close(timeout=30)

    started = time.monotonic()
    ending = end_run(dead, run_id, "FINISHED", str(spool))
    assert time.monotonic() - started < 30  # MLflow's own default: about 4 minutes
    assert not ending.marked and ending.unsent == 1 and ending.folder == spool / run_id
    assert ending.error == "connection refused" and spooled_runs(spool) == [run_id]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "RUNNING"

    synced = sync_run(uri, run_id, spool)
    assert synced.marked and synced.sent == 1 and synced.status == "FINISHED"
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"
    assert history(uri, run_id, "train/loss") == [(1, 0.5)]
    assert spooled_runs(spool) == []
    again = sync_run(uri, run_id, spool)  # idempotent: nothing left to do
    assert again.marked and again.sent == 0 and again.status is None
