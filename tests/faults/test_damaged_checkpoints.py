"""Damaged checkpoint folders, then the same `gentrain run` again: it continues from the
newest good checkpoint, names what was wrong with each newer one, exits 0, and ends with
the weights of an uninterrupted run.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_damaged_checkpoints.py -q

One uninterrupted reference run (12 steps, a checkpoint every 4, two Ray workers, fp32)
is shared; each test copies its folders, damages them as a crash or a full disk would,
and reruns. Two damage kinds per rerun keep the file near 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gentrain.checkpoint import MODEL_FILE, META_FILE, RAY_SNAPSHOT_FILE, step_dir_name

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NAME = "vae-debug"
SETTINGS = ["train.steps=12", "train.schedule.warmup_steps=2", "checkpoint.every=4",
            "checkpoint.keep=10", "scaling.num_workers=2", "eval.every=0", "eval.max_batches=1",
            "train.log_every=4", "tracking.enabled=false", "strategy.precision=fp32"]


def gentrain_run(storage: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "jobs"),
                                         env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "gentrain.cli", "run", "vae/debug", f"name={NAME}",
         f"storage_path={storage}", *SETTINGS],
        cwd=storage.parent, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    return result


def weights(run_dir: Path, step: int = 12) -> dict[str, torch.Tensor]:
    saved = torch.load(run_dir / step_dir_name(step) / MODEL_FILE, map_location="cpu", weights_only=True)
    return {f"{network}.{key}": value for network, state in saved["networks"].items()
            for key, value in state.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run directory of one uninterrupted run: step-4, step-8 and step-12 folders."""
    storage = tmp_path_factory.mktemp("reference") / "runs"
    gentrain_run(storage)
    run_dir = storage / NAME
    assert (run_dir / RAY_SNAPSHOT_FILE).is_file()  # Ray registered every folder: its snapshot names them
    return run_dir


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
    expected, got = weights(reference), weights(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)


def test_truncated_model_and_half_written_state_fall_back_past_both(reference, tmp_path):
    run_dir = damaged_copy(reference, tmp_path)
    kept, expected = cut(run_dir / step_dir_name(12) / MODEL_FILE)  # truncated model file
    state_kept, state_expected = cut(run_dir / step_dir_name(8) / "ddp_state.pt")  # metadata, half a file

    result = gentrain_run(run_dir.parent)

    out = result.stdout
    assert (f"[gentrain] not using step-00000012: model.pt is {kept:,} bytes, expected {expected:,} "
            "(truncated?); falling back to step-00000004") in out, out
    assert (f"[gentrain] not using step-00000008: ddp_state.pt is {state_kept:,} bytes, expected "
            f"{state_expected:,} (truncated?); falling back to step-00000004") in out, out
    assert_resumed_to_the_same_weights(result, reference, run_dir, 4)


def test_missing_metadata_and_deleted_folder_fall_back_and_ray_still_starts(reference, tmp_path):
    run_dir = damaged_copy(reference, tmp_path)
    (run_dir / step_dir_name(8) / META_FILE).unlink()  # weights without step and data position
    shutil.rmtree(run_dir / step_dir_name(12))  # Ray's snapshot still names it
    assert "step-00000012" in (run_dir / RAY_SNAPSHOT_FILE).read_text()

    result = gentrain_run(run_dir.parent)

    out = result.stdout
    assert "[gentrain] not using step-00000008: no gentrain.json" in out, out
    assert "does not exist anymore" not in out + result.stderr
    assert_resumed_to_the_same_weights(result, reference, run_dir, 4)
