"""Damaged checkpoint folders, then the same `gentrain run` again: it continues from the
newest good checkpoint, names what was wrong with each newer one, exits 0, and ends with
the weights of an uninterrupted run.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_damaged_checkpoints.py -q

One uninterrupted reference run (12 steps, a checkpoint every 2, two Ray workers, fp32:
conftest.py's `reference`, shared with test_operator_faults.py) is compared against. One
test copies its folders, damages the four newest as a crash, a full disk or a hand would
(one kind each) and reruns; one kills a worker the moment a checkpoint is complete on
disk. Three runs in all: about 2.5 minutes on 2 idle cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gentrain.checkpoint import MODEL_FILE, META_FILE, RAY_SNAPSHOT_FILE, step_dir_name
from runs import NAME, assert_same_weights, gentrain_run, kill_a_worker_at_step_4_and_finish

pytestmark = pytest.mark.slow


def damaged_copy(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / NAME
    shutil.copytree(reference, run_dir)  # the Ray snapshot too: it still names every folder
    return run_dir


def cut(path: Path) -> tuple[int, int]:
    """Keep the first half of a file, as a full disk would; (bytes kept, bytes expected)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return len(data) // 2, len(data)


def assert_resumed_to_the_same_weights(result, reference: Path, run_dir: Path, step: int) -> None:
    out = result.stdout
    assert f"[gentrain] continuing {NAME} from step {step} ({run_dir / step_dir_name(step)})" in out, out
    assert f"[gentrain] resumed from step {step} ({run_dir / step_dir_name(step)})" in out, out
    assert "done:" in out
    assert_same_weights(reference, run_dir)


def test_damaged_folders_of_each_kind_fall_back_to_the_newest_good_one(reference, tmp_path):
    run_dir = damaged_copy(reference, tmp_path)
    shutil.rmtree(run_dir / step_dir_name(12))  # deleted entirely: Ray's snapshot still names it
    assert "step-00000012" in (run_dir / RAY_SNAPSHOT_FILE).read_text()
    kept, expected = cut(run_dir / step_dir_name(10) / MODEL_FILE)  # a truncated model file
    state_kept, state_expected = cut(run_dir / step_dir_name(8) / "portable_state.pt")  # metadata, half a file
    (run_dir / step_dir_name(6) / META_FILE).unlink()  # weights without step and data position

    result = gentrain_run(run_dir.parent)

    out = result.stdout
    assert (f"[gentrain] not using step-00000010: model.pt is {kept:,} bytes, expected {expected:,} "
            "(truncated?); falling back to step-00000004") in out, out
    assert (f"[gentrain] not using step-00000008: portable_state.pt is {state_kept:,} bytes, expected "
            f"{state_expected:,} (truncated?); falling back to step-00000004") in out, out
    assert ("[gentrain] not using step-00000006: no gentrain.json (never finished: weights without "
            "their step and data position); falling back to step-00000004") in out, out
    assert "does not exist anymore" not in out + result.stderr
    assert_resumed_to_the_same_weights(result, reference, run_dir, 4)


def test_a_complete_folder_is_used_even_if_a_kill_beat_its_registration(reference, tmp_path):
    """SIGKILL of a worker the moment step-4 is complete on disk (its report may not have
    reached Ray's controller): the restarted workers continue from step 4 or later, never
    from the start, and the run ends with the uninterrupted weights."""
    kill_a_worker_at_step_4_and_finish(reference, tmp_path / "runs")
