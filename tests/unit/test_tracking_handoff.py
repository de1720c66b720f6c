"""Rank 0 hands its MLflow records to the driver (RunLogger(handoff=True) + tracking.relay.Relay):
the worker side imports no MLflow, the driver's one logger sends everything in order, keeps
the repeat rule across a worker restart, and a killed driver's leftovers are sent by
`gentrain sync` (local SQLite store, no server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gentrain.tracking import open_run, sync_run
from gentrain.tracking.logger import RunLogger
from gentrain.tracking.relay import Relay
from gentrain.tracking.spool import HANDOFF_DIR, PENDING_FILE, _Spool, handoff_files, spooled_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('handoff') / 'mlflow.db'}"


def test_the_worker_side_imports_no_mlflow(tmp_path):
    """What rank 0 imports to train and log with handoff, system metrics included: no MLflow
    module at all."""
    code = (
        "import sys\n"
        "import gentrain.loop, gentrain.engine, gentrain.tracking.system\n"
        "from gentrain.tracking.logger import RunLogger\n"
        "from gentrain.tracking.system import SystemMetrics\n"
        f"logger = RunLogger('sqlite:///unused.db', 'r1', spool_dir={str(tmp_path)!r}, handoff=True)\n"
        "monitor = SystemMetrics(logger, 60).start()\n"
        "logger.log_metrics({'loss': 1.0}, step=1)\n"
        "monitor.stop()  # one sample: CPU, memory, disk, network\n"
        "assert logger.close() is True\n"
        "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')))\n")
    env = {"PYTHONPATH": f"{ROOT / 'platform'}:{ROOT / 'jobs'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
    batches = handoff_files(tmp_path / "r1" / HANDOFF_DIR)
    keys = {item[0] for batch in batches for record in _Spool(batch).read() for item in record["items"]}
    assert {"loss", "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/disk_usage_percentage", "system/network_receive_megabytes"} <= keys, keys


def test_the_relay_sends_metrics_tags_and_artifacts_in_order_then_deletes_the_files(sqlite_uri, tmp_path):
    run_id = open_run(sqlite_uri, "handoff", "relay")
    spool = tmp_path / "spool"
    worker = RunLogger(sqlite_uri, run_id, spool_dir=spool, handoff=True)
    grid = tmp_path / "grid.txt"
    grid.write_text("step 2", encoding="utf-8")
    for step in (1, 2, 3):
        worker.log_metrics({"loss": 1.0 / step}, step=step)
    worker.log_artifact(grid, "samples")
    grid.write_text("overwritten at once", encoding="utf-8")  # the logger copied it
    worker.set_tag("phase", "warm")
    assert worker.close() is True
    assert handoff_files(spool / run_id / HANDOFF_DIR)  # waiting for the driver

    relay = Relay(sqlite_uri, run_id, str(spool), interval=0.05)
    assert relay.close(timeout=30) is True
    client = MlflowClient(tracking_uri=sqlite_uri)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "warm"
    [artifact] = client.list_artifacts(run_id, "samples")
    assert artifact.path == "samples/grid.txt"
    local = client.download_artifacts(run_id, "samples/grid.txt", str(tmp_path / "down"))
    assert Path(local).read_text(encoding="utf-8") == "step 2"
    assert not handoff_files(spool / run_id / HANDOFF_DIR)
    assert not (spool / run_id / PENDING_FILE).exists()


def test_a_restarted_worker_hands_off_to_the_same_relay_and_repeats_are_dropped(sqlite_uri, tmp_path):
    """A worker restart retrains steps after its checkpoint: the driver's logger, which
    outlives it, keeps the first value logged at each step."""
    run_id = open_run(sqlite_uri, "handoff", "restart")
    spool = tmp_path / "spool"
    relay = Relay(sqlite_uri, run_id, str(spool), interval=0.05)
    first = RunLogger(sqlite_uri, run_id, spool_dir=spool, handoff=True)
    for step in (1, 2, 3, 4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close()
    assert relay.forward(timeout=30) in (0, 4)  # the relay's thread may have taken them already
    second = RunLogger(sqlite_uri, run_id, spool_dir=spool, handoff=True)  # resumed from step 2
    for step in (3, 4, 5):
        second.log_metrics({"loss": 10.0 * step}, step=step)
    second.close()
    assert relay.close(timeout=30) is True
    history = MlflowClient(tracking_uri=sqlite_uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]


def test_what_a_killed_driver_left_is_sent_by_sync(sqlite_uri, tmp_path):
    run_id = open_run(sqlite_uri, "handoff", "orphaned")
    spool = tmp_path / "spool"
    worker = RunLogger(sqlite_uri, run_id, spool_dir=spool, handoff=True)
    worker.log_metrics({"loss": 0.25}, step=7)
    worker.close()
    assert spooled_runs(spool) == [run_id]  # `gentrain sync` finds it
    ending = sync_run(sqlite_uri, run_id, spool, status="KILLED")
    assert ending.marked and ending.sent == 1, ending
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(run_id)
    assert (run.data.metrics, run.info.status) == ({"loss": 0.25}, "KILLED")
    assert spooled_runs(spool) == [] and not handoff_files(spool / run_id / HANDOFF_DIR)


def test_a_handoff_folder_it_cannot_write_makes_rank_0_send_itself(sqlite_uri, tmp_path, caplog):
    """A full or read-only run folder: nothing is lost and nothing is printed as a traceback;
    rank 0 sends from then on, as it does without handoff."""
    import logging

    caplog.set_level(logging.INFO, logger="gentrain.tracking")
    run_id = open_run(sqlite_uri, "handoff", "unwritable")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder would be", encoding="utf-8")
    worker = RunLogger(sqlite_uri, run_id, spool_dir=blocker, handoff=True)
    worker.log_metrics({"loss": 2.0}, step=1)
    assert worker.flush(timeout=30) is True
    worker.log_metrics({"loss": 1.0}, step=2)
    assert worker.close(timeout=30) is True
    history = MlflowClient(tracking_uri=sqlite_uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0)]
    said = [record for record in caplog.records if record.name == "gentrain.tracking"]
    assert [record.levelname for record in said] == ["INFO"], [r.getMessage() for r in said]
    assert "rank 0 sends them itself from now on" in said[0].getMessage() and said[0].exc_info is None


def test_a_file_forwarded_again_sends_nothing_twice_and_the_ended_run_leaves_no_copies(sqlite_uri, tmp_path, caplog):
    """A driver killed after its logger sent a handoff file's artifact but before it deleted
    the file: the next driver forwards the file again, whose artifact's staged copy is gone
    (sent) — no warning, no second copy. A copy staged by a worker killed before it wrote its
    record is removed once the run has ended with nothing left to send."""
    import logging
    import shutil

    from gentrain.tracking import end_run
    from gentrain.tracking.spool import STAGED_DIR

    caplog.set_level(logging.WARNING, logger="gentrain.tracking")
    run_id = open_run(sqlite_uri, "handoff", "forwarded-again")
    spool = tmp_path / "spool"
    grid = tmp_path / "grid.txt"
    grid.write_text("step 3", encoding="utf-8")
    worker = RunLogger(sqlite_uri, run_id, spool_dir=spool, handoff=True)
    worker.log_metrics({"loss": 0.5}, step=3)
    worker.log_artifact(grid, "samples")
    assert worker.close() is True
    kept = tmp_path / "kept"
    shutil.copytree(spool / run_id / HANDOFF_DIR, kept)  # what the killed driver had not deleted

    assert Relay(sqlite_uri, run_id, str(spool), interval=0.05).close(timeout=30) is True
    shutil.copytree(kept, spool / run_id / HANDOFF_DIR, dirs_exist_ok=True)
    orphan = spool / run_id / STAGED_DIR / "0123abcd"
    orphan.mkdir(parents=True)
    (orphan / "step-00000030.png").write_bytes(b"never recorded")

    assert Relay(sqlite_uri, run_id, str(spool), interval=0.05).close(timeout=30) is True
    ending = end_run(sqlite_uri, run_id, "FINISHED", str(spool))
    assert ending.marked, ending
    client = MlflowClient(tracking_uri=sqlite_uri)
    assert [artifact.path for artifact in client.list_artifacts(run_id, "samples")] == ["samples/grid.txt"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
    assert [record.getMessage() for record in caplog.records] == []
    assert not (spool / run_id / STAGED_DIR).exists() and spooled_runs(spool) == []
