"""DDP/Accelerate checkpoints store weights and optimizer moments once, and resume exactly.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_replica_checkpoint.py -q

A replicated run's own file (ddp_state.pt, accelerate_state.pt) holds the loss scaler only;
weights, EMA, Adam moments and schedules are read back from model.pt and portable_state.pt.
One process, world size 1, no Ray.
"""

from __future__ import annotations

import os

import pytest
import torch

import gentrain
from gentrain.checkpoint import MODEL_FILE
from gentrain.engine import Engine
from gentrain.strategies import accelerate, ddp
from gentrain.strategies.portable import PORTABLE_FILE

STATE_FILES = {"ddp": ddp.STATE_FILE, "accelerate": accelerate.STATE_FILE}


def _engine(tmp_path, strategy: str, job: str = "vae/debug") -> Engine:
    spec = gentrain.load(job, ["train.steps=8", "train.schedule.warmup_steps=2", "train.batch_size=8",
                               "eval.num_samples=4", "eval.max_batches=1", f"storage_path={tmp_path}",
                               "tracking.enabled=false", f"strategy.name={strategy}"])
    return Engine(spec, print_fn=None)


def _state(engine: Engine) -> dict[str, torch.Tensor]:
    """Weights, EMA and every Adam moment of every network, flat."""
    strategy = engine.strategy
    flat = {f"w.{n}.{k}": v for n, weights in strategy.export_state_dicts().items() for k, v in weights.items()}
    flat.update({f"ema.{n}.{k}": v for n, average in strategy.ema.state_dict().items() for k, v in average.items()})
    for name, optimizer in strategy._optimizers.items():
        for index, moments in optimizer.state_dict()["state"].items():
            flat.update({f"opt.{name}.{index}.{key}": value for key, value in moments.items()})
    return flat


def _assert_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("strategy,job", [("ddp", "vae/debug"), ("accelerate", "vae/debug"),
                                          ("ddp", "gan/debug")])  # gan: two networks and an EMA
def test_resume_is_exact_and_the_state_file_holds_only_the_scaler(tmp_path, strategy, job):
    straight = _engine(tmp_path / "a", strategy, job)
    batches = straight.train_batches()
    for _ in range(3):
        straight.optimizer_step(batches)
    folder = str(tmp_path / "a" / "checkpoint")
    straight.save(folder)
    assert set(torch.load(os.path.join(folder, STATE_FILES[strategy]), weights_only=True)) == {"scaler"}
    assert os.path.getsize(os.path.join(folder, STATE_FILES[strategy])) < 4096
    for _ in range(3):
        straight.optimizer_step(batches)

    resumed = _engine(tmp_path / "b", strategy, job)
    resumed.restore(folder)
    assert resumed.step == 3
    batches = resumed.train_batches()
    for _ in range(3):
        resumed.optimizer_step(batches)
    _assert_equal(_state(straight), _state(resumed))


def test_a_full_state_file_of_an_older_gentrain_still_loads(tmp_path):
    """Checkpoints written before the state file shrank held modules, optimizers, schedules
    and EMA in ddp_state.pt: they restore from it as before."""
    engine = _engine(tmp_path / "a", "ddp")
    batches = engine.train_batches()
    for _ in range(2):
        engine.optimizer_step(batches)
    folder = str(tmp_path / "old")
    os.makedirs(folder)
    strategy = engine.strategy
    torch.save({"modules": {"vae": strategy.unwrap("vae").state_dict()},
                "optimizers": {"vae": strategy._optimizers["vae"].state_dict()},
                "schedulers": {"vae": strategy._schedulers["vae"].state_dict()},
                "scaler": strategy._scaler.state_dict(), "ema": strategy.ema.state_dict()},
               os.path.join(folder, ddp.STATE_FILE))
    assert not os.path.exists(os.path.join(folder, MODEL_FILE))
    assert not os.path.exists(os.path.join(folder, PORTABLE_FILE))

    other = _engine(tmp_path / "b", "ddp")
    other.strategy.load(folder)
    _assert_equal(_state(engine), _state(other))
    assert other.strategy._schedulers["vae"].last_epoch == 2
