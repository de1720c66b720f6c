"""`gentrain run` with checkpoint.asynchronous=true through Ray Train: the same weights as the
synchronous reference run, checkpoint.keep still prunes, and a worker killed mid-run resumes
from a verified folder to the same weights.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_async_checkpoints.py -q

Compared against conftest.py's `reference` (the same SETTINGS, written synchronously).
Two runs besides it: about 1.5 minutes on 2 idle cores.
"""

from __future__ import annotations


import pytest

from gentrain.checkpoint import RAY_SNAPSHOT_FILE, checkpoint_problem, step_dir_name, step_folders
from runs import NAME, STEPS, assert_same_weights, gentrain_run, kill_a_worker_at_step_4_and_finish

pytestmark = pytest.mark.slow
ASYNC = "checkpoint.asynchronous=true"


def test_background_checkpoints_end_with_the_reference_weights_and_keep_prunes(reference, tmp_path):
    storage = tmp_path / "runs"
    result = gentrain_run(storage, ASYNC, "checkpoint.keep=3")
    assert "done:" in result.stdout
    run_dir = storage / NAME
    assert [step for step, _ in step_folders(str(run_dir))] == [STEPS - 4, STEPS - 2, STEPS]  # checkpoint.keep
    for _, folder in step_folders(str(run_dir)):
        assert checkpoint_problem(folder) is None, folder
    assert step_dir_name(STEPS) in (run_dir / RAY_SNAPSHOT_FILE).read_text()  # Ray registered the last one
    assert_same_weights(reference, run_dir)


def test_a_worker_killed_while_checkpoints_are_written_in_the_background_resumes_exactly(reference, tmp_path):
    """SIGKILL of a worker the moment step-4 is complete on disk: step-6 may be half-written
    then; the restarted workers continue from a verified folder (step 4 or later) and end
    with the reference weights."""
    kill_a_worker_at_step_4_and_finish(reference, tmp_path / "runs", ASYNC)
