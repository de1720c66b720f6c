"""The messages an operator fault ends in, without starting Ray: one line per worker
failure (gentrain.launch.failures), the raylet's death notice kept off the console
(gentrain.launch.console), one paragraph for full or read-only storage
(gentrain.launch.storage). The same messages from real runs: tests/faults/test_operator_faults.py.
"""

from __future__ import annotations

import errno
import io
import json

import pytest
from ray.exceptions import RayActorError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from gentrain.checkpoint import META_FILE, step_dir_name
from gentrain.launch import console
from gentrain.data.errors import ShardReadError
from gentrain.launch.failures import FailureReporter, data_failure, death_failure, describe
from gentrain.launch.storage import StorageError, check_writable, storage_failure


def dead_worker(pid: int) -> WorkerHealthCheckFailedError:
    """What Ray Train's controller holds for a rank whose process was SIGKILLed."""
    died = RayActorError(error_msg=f"The actor died unexpectedly before finishing this task.\n\tpid: {pid}\n"
                                   "Worker exit type: SYSTEM_ERROR")
    return WorkerHealthCheckFailedError(f"A worker health check failed.\n  metadata=ActorMetadata(pid={pid})", died)


def test_one_line_per_failure_counted_against_max_failures(capsys):
    reporter = FailureReporter(max_failures=2)
    broken = RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer")
    reporter.after_exception(None, {0: broken, 1: dead_worker(4242)})
    reporter.after_exception(None, {0: dead_worker(4343)})
    reporter.after_exception(None, {1: ValueError("bad input\nsecond line")})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[gentrain] worker 1 (pid 4242) died (killed by a signal such as SIGKILL, by the OOM killer, "
        "or crashed) (worker 0 failed with it); restarting the workers from the newest good "
        "checkpoint (failure 1 of 2 allowed by checkpoint.max_failures)",
        "[gentrain] worker 0 (pid 4343) died (killed by a signal such as SIGKILL, by the OOM killer, "
        "or crashed); restarting the workers from the newest good checkpoint (failure 2 of 2 allowed "
        "by checkpoint.max_failures)",
    ]  # the third failure, with no restart left, is the driver's error to say (the run's last line)
    assert reporter.failures == 3


def test_no_restarts_allowed_and_a_preemption_is_not_counted(capsys):
    reporter = FailureReporter(max_failures=0)
    reporter.after_exception(None, {0: RayActorError(error_msg="node preempted", preempted=True)})
    assert capsys.readouterr().out == "" and reporter.failures == 0
    reporter.after_exception(None, {1: dead_worker(7)})
    assert capsys.readouterr().out == "" and reporter.failures == 1  # the driver's error says it
    assert describe(3, OSError("no pid here")) == "worker 3 failed (OSError: no pid here)"


def test_the_raylet_death_notice_goes_to_the_buffer_and_other_notices_print(monkeypatch):
    import ray._private.worker as ray_worker

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    quiet = console.WorkerConsole(out=io.StringIO(), err=io.StringIO(), redraw=False)
    monkeypatch.setattr(console, "_console", quiet)
    console._divert_death_notices()
    console._divert_death_notices()  # idempotent: wrapped once
    notice = ("A worker died or was killed while executing a task by an unexpected system error. "
              "Worker PID: 4242 Worker exit type: SYSTEM_ERROR")
    ray_worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    other = {"lines": ["Task was killed due to the node running low on memory."], "pid": "raylet", "is_err": False}
    ray_worker.print_to_stdstream(other, ignore_prefix=False)
    assert printed == [other]
    assert list(quiet.recent) == [f"(ray pid=raylet) {notice}"]


def test_full_storage_from_the_workers_errors_is_one_paragraph(tmp_path):
    run_dir = tmp_path / "runs" / "vae-debug"
    good, cut = run_dir / step_dir_name(6), run_dir / step_dir_name(8)
    good.mkdir(parents=True)
    cut.mkdir()
    import torch

    torch.save({"networks": {}}, good / "model.pt")
    from gentrain.checkpoint import file_manifest

    (good / META_FILE).write_text(json.dumps({"step": 6, "batches_consumed": 6, "files": file_manifest(good)}))
    (cut / "model.pt").write_bytes(b"")
    worker = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    failed = WorkerGroupError("Training failed due to worker errors", {0: worker, 1: dead_worker(9)})
    text = storage_failure(failed, str(tmp_path / "runs"), str(run_dir))
    assert text == (f"storage_path {tmp_path / 'runs'}: no space left on device ([Errno 28] Error writing "
                    f"bytes to file. Detail: [errno 28] No space left on device). step-00000008 was cut "
                    f"short and will not be used. To fix: free space there or set storage_path to a "
                    f"larger disk, then run the same command to continue from step 6 ({good}).")
    # Only the text came back (Ray's wrappers): the errno in it is enough.
    as_text = RuntimeError("...\nOSError: [Errno 30] Read-only file system: '/mnt/runs/x/step-2'\n")
    assert "read-only file system" in storage_failure(as_text, "/mnt/runs", str(run_dir))
    assert storage_failure(RuntimeError("CUDA out of memory"), "/mnt/runs", str(run_dir)) is None
    # A full disk elsewhere (a worker's temporary folder) is not storage_path's.
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpab12/model.pt")
    assert storage_failure(elsewhere, str(tmp_path / "runs"), str(run_dir)) is None
    assert storage_failure(worker, "s3://bucket/runs", "s3://bucket/runs/vae-debug") is None


def test_a_storage_that_refuses_writes_is_refused_before_anything_starts(tmp_path, monkeypatch):
    check_writable(str(tmp_path), str(tmp_path / "run"))  # writable: nothing to say
    assert not (tmp_path / "run").exists()  # the probe and the folder made for it are gone
    (tmp_path / "kept").mkdir()
    check_writable(str(tmp_path), str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())  # an existing one stays

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(StorageError) as raised:
        check_writable(str(tmp_path), str(tmp_path / "run"))
    assert str(raised.value) == (f"storage_path {tmp_path}: no space left on device ([Errno 28] No space "
                                 "left on device); nothing was started. To fix: free space there or set "
                                 "storage_path to a larger disk, then run the same command again.")


def test_a_worker_death_with_no_restart_left_is_one_paragraph(tmp_path):
    broken = RuntimeError("Traceback (most recent call last):\n ... Connection reset by peer")
    failed = WorkerGroupError("Training failed due to worker errors", {0: broken, 1: dead_worker(4242)})
    assert death_failure(failed, 0, str(tmp_path / "run")) == (
        "worker 1 (pid 4242) died (killed by a signal such as SIGKILL, by the OOM killer, or crashed), "
        "no restarts allowed (checkpoint.max_failures=0). Run the same command to start again from "
        "step 0 (no complete checkpoint yet); raise checkpoint.max_failures to let Ray Train restart "
        "the workers within a run.")
    assert "all 3 restarts of checkpoint.max_failures used" in death_failure(failed, 3, str(tmp_path))
    only_raised = WorkerGroupError("Training failed due to worker errors", {0: broken})
    assert death_failure(only_raised, 3, str(tmp_path)) is None
    assert death_failure(ValueError("x"), 3, str(tmp_path)) is None


def test_a_shard_that_cannot_be_read_is_one_paragraph(tmp_path):
    reason = ("cannot read shard /data/train-000004.tar: ReadError: invalid header; repack it (`gentrain data "
              "pack`) or, to train on without it, set `data.on_error: skip`")
    broken = RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer")
    failed = WorkerGroupError("Training failed due to worker errors", {0: ShardReadError(reason), 1: broken})
    assert data_failure(failed, 0, str(tmp_path / "run")) == (
        f"worker 0: {reason}; then run the same command to start from step 0 (no complete checkpoint was written).")
    # As text only (a worker's traceback as Ray Train relays it), after two retries.
    relayed = RuntimeError(f"Traceback (most recent call last):\n  ...\ngentrain.data.errors.ShardReadError: {reason}\n")
    retried = data_failure(WorkerGroupError("Training failed", {1: relayed}), 2, str(tmp_path))
    assert retried.startswith(f"worker 1: {reason}; then run the same command to start from step 0")
    assert retried.endswith("Ray Train restarted the workers 2 times (checkpoint.max_failures): a shard that "
                            "cannot be read fails the same way each time.")
    assert data_failure(WorkerGroupError("Training failed", {0: broken}), 0, str(tmp_path)) is None
    assert data_failure(ValueError("x"), 0, str(tmp_path)) is None
