"""Non-finite losses and gradients in one process (no Ray): stop, skip, the advice, no save.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_nonfinite_engine.py -q

A NaN gradient is injected with a tensor hook on one parameter at one step (the test's own
hook; nothing in gentrain knows about it). Distributed cases: tests/distributed/test_nonfinite_world.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import gentrain
from gentrain.checkpoint import META_FILE, MODEL_FILE
from gentrain.engine import Engine
from gentrain.nonfinite import Finding, NonFiniteError, NonFiniteFound, NonFiniteGuard, SpecFacts, stop_message
from gentrain.progress import Window
from gentrain.schema import SpecError

PARAMETER = "decoder.blocks.1.1.weight"
POISON = 2  # optimizer steps done when the poisoned one starts: it is step 3


def _spec(tmp_path, *overrides):
    return gentrain.load("vae/debug", ["train.steps=6", "train.schedule.warmup_steps=2", "train.batch_size=8",
                                       "eval.num_samples=4", "eval.max_batches=1", f"storage_path={tmp_path}",
                                       "tracking.enabled=false", *overrides])


def _poison(engine: Engine, steps: set[int] | None = None):
    """NaN into PARAMETER's gradient whenever engine.step is in `steps` (None: always)."""
    parameter = engine.strategy.unwrap("vae").get_parameter(PARAMETER)

    def hook(grad):
        return torch.full_like(grad, float("nan")) if steps is None or engine.step in steps else grad

    return parameter.register_hook(hook)


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    return engine.strategy.export_state_dicts()["vae"]


def test_stop_names_step_and_parameter_and_makes_no_update(tmp_path):
    engine = Engine(_spec(tmp_path), print_fn=None)
    _poison(engine, {POISON})
    batches = engine.train_batches()
    for _ in range(POISON):
        engine.optimizer_step(batches)
    before = _weights(engine)
    with pytest.raises(NonFiniteError) as raised:
        engine.optimizer_step(batches)
    message = str(raised.value)
    assert f"at step {POISON + 1} in network 'vae'" in message
    assert f"the gradient of {PARAMETER} is not finite" in message
    assert "the loss was finite" in message
    # vae/debug clips (train.grad_clip 1.0) in fp32: neither is suggested; the lr is, with its value.
    assert "train.optimizer.lr (now 0.002" in message and "train.nonfinite=skip" in message
    assert "grad_clip" not in message and "precision" not in message
    for key, value in _weights(engine).items():
        assert torch.equal(value, before[key]), key


def test_advice_depends_on_the_spec():
    finding = Finding("generator", "loss", "net.0.weight")
    facts = SpecFacts("skip", 4, grad_clip=None, precision="bf16", lr=5e-5, base_lr=1e-4)
    message = stop_message(finding, 9, facts)
    assert message.startswith("non-finite values at step 10 in network 'generator': its loss is not finite")
    assert "first net.0.weight" in message
    assert ("train.optimizer.lr (now 0.0001; 5e-05 at this step of the schedule), "
            "e.g. train.optimizer.lr=1e-05") in message
    assert "set train.grad_clip" in message and "strategy.precision=fp32 (now bf16)" in message
    assert "train.nonfinite_max_skips (now 4)" in message and "train.nonfinite=skip" not in message


def test_skip_drops_the_update_counts_it_and_goes_on(tmp_path, capsys):
    engine = Engine(_spec(tmp_path, "train.nonfinite=skip"), print_fn=None)
    _poison(engine, {POISON})
    batches = engine.train_batches()
    window = Window()
    for _ in range(4):
        window.add(engine.optimizer_step(batches))
    assert engine.step == 4 and engine.strategy.nonfinite.skipped == 1
    metrics = engine.train_metrics(window)
    assert metrics["train/nonfinite_skipped"] == 1
    assert all(torch.isfinite(value).all() for value in _weights(engine).values())
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert f"skipped an update of vae: the gradient of {PARAMETER} is not finite" in capsys.readouterr().out


def test_skip_stops_past_max_skips_in_a_row(tmp_path):
    engine = Engine(_spec(tmp_path, "train.nonfinite=skip", "train.nonfinite_max_skips=2"), print_fn=None)
    _poison(engine)
    batches = engine.train_batches()
    engine.optimizer_step(batches)
    engine.optimizer_step(batches)
    with pytest.raises(NonFiniteError, match="3 updates in a row \\(train.nonfinite_max_skips=2\\)"):
        engine.optimizer_step(batches)
    assert engine.strategy.nonfinite.skipped == 2


def test_save_refuses_non_finite_weights(tmp_path):
    engine = Engine(_spec(tmp_path), print_fn=None)
    with torch.no_grad():
        engine.strategy.unwrap("vae").get_parameter(PARAMETER)[0, 0] = float("inf")
    folder = tmp_path / "step-0"
    with pytest.raises(NonFiniteError, match=f"refusing to save the checkpoint of step 0.*vae: {PARAMETER}"):
        engine.save(folder)
    assert not os.path.exists(folder / META_FILE) and not os.path.exists(folder / MODEL_FILE)


def test_spec_policy_is_checked(tmp_path):
    with pytest.raises(SpecError, match="train.nonfinite"):
        _spec(tmp_path, "train.nonfinite=rollback")
    with pytest.raises(SpecError, match="'skip' is not supported with strategy.name=deepspeed"):
        _spec(tmp_path, "train.nonfinite=skip", "strategy.name=deepspeed")


def test_window_leaves_non_finite_values_out_of_the_means():
    window = Window()
    window.add({"loss": 1.0, "grad_norm/vae": 2.0})
    window.add({"loss": float("nan")})  # a skipped step
    window.add({"loss": 3.0, "grad_norm/vae": 4.0})
    assert window.means() == {"loss": 2.0, "grad_norm/vae": 3.0} and window.count == 3


def test_skips_in_a_row_are_counted_per_network():
    """A GAN's generator updating fine between them must not hide a critic skipped forever."""
    guard = NonFiniteGuard("skip", max_skips=2)
    same = lambda flags: flags  # noqa: E731 - one process: the all-reduce is the identity
    for _ in range(2):
        assert not guard.allows_update("discriminator", torch.tensor(True), same, lambda: "net.0.weight")
        assert guard.allows_update("generator", torch.tensor(False), same, lambda: None)
    with pytest.raises(NonFiniteFound) as raised:
        guard.allows_update("discriminator", torch.tensor(True), same, lambda: "net.0.weight")
    assert (raised.value.finding.network, raised.value.finding.consecutive) == ("discriminator", 3)
    assert guard.skipped == 2
