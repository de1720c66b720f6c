"""checkpoint.asynchronous on one process (no Ray): the snapshot is a copy, writes are one at
a time, a failed write is raised in the loop, and the spec refuses what cannot be snapshot.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_checkpoint_writer.py -q

World size 2 with real process groups and the bit-for-bit resume: tests/distributed/
test_async_checkpoint_world.py; through Ray Train (retention, a killed worker):
tests/faults/test_async_checkpoints.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import gentrain
from gentrain.checkpoint import MODEL_FILE, checkpoint_problem, read_meta
from gentrain.checkpoint_writer import CheckpointWriteError, host_copy
from gentrain.engine import Engine
from gentrain.schema import SpecError


def _engine(tmp_path, *overrides: str, strategy: str = "ddp") -> Engine:
    spec = gentrain.load("vae/debug", ["train.steps=4", "train.schedule.warmup_steps=1", "train.batch_size=8",
                                       "eval.num_samples=4", "eval.max_batches=1", f"storage_path={tmp_path}",
                                       "tracking.enabled=false", f"strategy.name={strategy}",
                                       "checkpoint.asynchronous=true", *overrides])
    return Engine(spec, print_fn=None)


def _tensors(folder) -> dict[str, torch.Tensor]:
    saved = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)
    return {f"{n}.{k}": v for n, state in saved["networks"].items() for k, v in state.items()}


def _same(left, right) -> bool:
    """Equal nested states, tensors bit for bit."""
    if torch.is_tensor(left):
        return torch.is_tensor(right) and torch.equal(left, right)
    if isinstance(left, dict):
        return isinstance(right, dict) and left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right))
    return left == right


@pytest.mark.parametrize("strategy", ["ddp", "accelerate"])
def test_the_snapshot_holds_the_state_of_its_step_not_of_later_ones(tmp_path, strategy):
    engine = _engine(tmp_path, strategy=strategy)
    batches = engine.train_batches()
    engine.optimizer_step(batches)
    engine.save(str(tmp_path / "now"))  # the synchronous save of the same moment
    snapshot = engine.snapshot()
    for _ in range(2):  # the live weights and Adam moments change in place
        engine.optimizer_step(batches)
    snapshot.write(str(tmp_path / "later"))

    assert checkpoint_problem(tmp_path / "later") is None
    assert read_meta(str(tmp_path / "later"))["step"] == 1
    now, later = _tensors(tmp_path / "now"), _tensors(tmp_path / "later")
    assert now.keys() == later.keys()
    for key in now:
        assert torch.equal(now[key], later[key]), key
    for name in ("portable_state.pt", f"{strategy}_state.pt"):
        assert _same(torch.load(tmp_path / "now" / name, weights_only=True),
                     torch.load(tmp_path / "later" / name, weights_only=True)), name


def test_host_copy_shares_no_tensor_memory():
    weights = torch.ones(3)
    state = {"w": weights, "groups": [{"betas": (0.9, 0.99), "moment": weights}]}
    copied = host_copy(state)
    weights.add_(1)
    assert torch.equal(copied["w"], torch.ones(3)) and torch.equal(copied["groups"][0]["moment"], torch.ones(3))
    assert copied["groups"][0]["betas"] == (0.9, 0.99)


def test_a_save_waits_for_the_previous_write(tmp_path):
    """The second background save returns only after the first folder is complete."""
    engine = _engine(tmp_path)
    batches = engine.train_batches()
    engine.optimizer_step(batches)
    engine.save_in_background(lambda snapshot: snapshot.write(str(tmp_path / "first")))
    engine.optimizer_step(batches)
    engine.save_in_background(lambda snapshot: snapshot.write(str(tmp_path / "second")))
    assert checkpoint_problem(tmp_path / "first") is None
    engine.wait_for_checkpoint()
    assert checkpoint_problem(tmp_path / "second") is None
    assert read_meta(str(tmp_path / "second"))["step"] == 2


def test_fit_ends_with_every_folder_complete(tmp_path):
    engine = _engine(tmp_path, "checkpoint.every=2")
    engine.fit()
    assert engine.checkpoint_writer.busy is False
    for step in (2, 4):
        assert checkpoint_problem(tmp_path / "vae-debug" / f"step-{step:08d}") is None


def test_a_failed_background_write_is_raised_in_the_training_loop(tmp_path):
    engine = _engine(tmp_path, "checkpoint.every=2")
    os.makedirs(tmp_path / "vae-debug")
    (tmp_path / "vae-debug" / "step-00000002").write_text("a file where the folder goes")
    with pytest.raises(CheckpointWriteError, match=r"step 2 \(step-00000002\).*checkpoint.asynchronous=true"):
        engine.fit()
    # raised after step 3 or by step 4's save, before it snapshots: no later checkpoint
    assert not (tmp_path / "vae-debug" / "step-00000004").exists()


def test_deepspeed_is_refused_with_the_field_and_the_fix():
    with pytest.raises(SpecError) as error:
        gentrain.load("vae/debug", ["strategy.name=deepspeed", "checkpoint.asynchronous=true"])
    assert "checkpoint.asynchronous: true is not available with strategy.name=deepspeed" in str(error.value)
    assert "set checkpoint.asynchronous=false" in str(error.value)
