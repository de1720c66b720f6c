"""Non-finite losses and gradients in one process (no Ray): stop, skip, rollback, the advice, no save.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_nonfinite_engine.py -q

A NaN gradient is injected with a tensor hook on one parameter at one step (the test's own
hook; nothing in gentrain knows about it). Distributed cases: tests/distributed/test_nonfinite_world.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import gentrain
from gentrain.checkpoint import META_FILE, MODEL_FILE, read_meta, step_dir_name
from gentrain.engine import Engine
from gentrain.nonfinite import (Finding, NonFiniteError, NonFiniteFound, NonFiniteGuard, NonFiniteRollback, SpecFacts,
                                stop_message)
from gentrain.progress import Window
from gentrain.schema import SpecError
from gentrain.strategies.portable import PORTABLE_FILE, named_optimizer_state

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
        _spec(tmp_path, "train.nonfinite=retry")
    for bad in ("0", "1", "1.5"):
        with pytest.raises(SpecError, match="train.nonfinite_lr_factor"):
            _spec(tmp_path, "train.nonfinite=rollback", f"train.nonfinite_lr_factor={bad}")
    with pytest.raises(SpecError, match="train.nonfinite_max_rollbacks"):
        _spec(tmp_path, "train.nonfinite=rollback", "train.nonfinite_max_rollbacks=0")
    with pytest.raises(SpecError, match="'rollback' needs a local or shared storage_path"):
        gentrain.load("vae/debug", ["train.nonfinite=rollback", "storage_path=s3://bucket/runs"])
    # DeepSpeed drops a skipped update through its own overflow path (test_nonfinite_world.py).
    assert _spec(tmp_path, "train.nonfinite=skip", "strategy.name=deepspeed").train.nonfinite == "skip"


# -- rollback -----------------------------------------------------------------------------
def _poison_once(engine: Engine, steps: set[int]):
    """NaN into PARAMETER's gradient the first time engine.step is in `steps` (then healthy)."""
    parameter = engine.strategy.unwrap("vae").get_parameter(PARAMETER)
    left = set(steps)

    def hook(grad):
        if engine.step in left:
            left.discard(engine.step)
            return torch.full_like(grad, float("nan"))
        return grad

    return parameter.register_hook(hook)


def test_rollback_restores_the_newest_checkpoint_lowers_the_lr_and_counts(tmp_path, capsys):
    spec = _spec(tmp_path, "train.nonfinite=rollback", "train.steps=8")
    engine = Engine(spec, print_fn=print)
    _poison_once(engine, {POISON + 1})  # step 4: after the step-2 checkpoint
    batches = engine.train_batches()
    engine.save(os.path.join(spec.run_dir, step_dir_name(0)))
    for _ in range(POISON):
        engine.optimizer_step(batches)
    folder = os.path.join(spec.run_dir, step_dir_name(POISON))
    engine.save(folder)
    engine.optimizer_step(batches)
    base, lr = engine.strategy.base_lr("vae"), engine.strategy.lr("vae")
    with pytest.raises(NonFiniteRollback) as raised:
        engine.optimizer_step(batches)
    assert engine.roll_back(raised.value) == folder
    assert (engine.step, engine.batches_consumed, engine.rollbacks, engine.lr_scale) == (POISON, POISON, 1, 0.5)
    saved = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)["networks"]["vae"]
    for key, value in _weights(engine).items():
        assert torch.equal(value, saved[key]), key
    state = torch.load(os.path.join(folder, PORTABLE_FILE), weights_only=True)
    optimizer = named_optimizer_state(engine.strategy._optimizers["vae"], engine.strategy.unwrap("vae"))
    assert state["optimizers"]["vae"]["state"].keys() == optimizer["state"].keys()
    for name, moments in state["optimizers"]["vae"]["state"].items():
        assert torch.equal(optimizer["state"][name]["exp_avg"], moments["exp_avg"]), name
    # The schedule is back at step 2 (its lr at step 3 was `lr`), every rate halved.
    assert engine.strategy.base_lr("vae") == base / 2
    assert engine.strategy._schedulers["vae"].last_epoch == POISON
    out = capsys.readouterr().out
    assert (f"non-finite values at step {POISON + 2} in network 'vae': the gradient of {PARAMETER} is not "
            f"finite") in out and f"rolled back to step {POISON} ({folder}), learning rate x0.5, now 0.001 (vae)" in out
    assert "rollback 1 of at most 3" in out
    # Training goes on from the restored data position, finite, with the lower lr.
    batches = engine.train_batches()
    window = Window()
    for _ in range(3):
        window.add(engine.optimizer_step(batches))
    assert engine.step == POISON + 3 and engine.strategy.lr("vae") < lr / 2
    assert engine.train_metrics(window)["train/nonfinite_rollbacks"] == 1
    # The lowered lr and the count survive a restart: in the checkpoint, and taken by a resume.
    later = os.path.join(spec.run_dir, step_dir_name(engine.step))
    engine.save(later)
    assert (read_meta(later)["lr_scale"], read_meta(later)["nonfinite_rollbacks"]) == (0.5, 1)
    resumed = Engine(spec, print_fn=None)
    resumed.restore(later)
    assert (resumed.rollbacks, resumed.lr_scale) == (1, 0.5)
    assert resumed.strategy.base_lr("vae") == base / 2 and resumed.strategy.lr("vae") == engine.strategy.lr("vae")


def test_rollbacks_exhausted_stop_as_stop_does(tmp_path, capsys):
    """A NaN at every step from the start: fit rolls back to its step-0 checkpoint twice,
    halving the lr each time, then stops naming the step, the parameter and the limit."""
    spec = _spec(tmp_path, "train.nonfinite=rollback", "train.nonfinite_max_rollbacks=2")
    engine = Engine(spec, print_fn=print)
    _poison(engine)
    with pytest.raises(NonFiniteError) as raised:
        engine.fit()
    message = str(raised.value)
    assert not isinstance(raised.value, NonFiniteRollback)
    assert message.startswith(f"non-finite values at step 1 in network 'vae': the gradient of {PARAMETER}")
    assert "rollbacks exhausted (2 made, train.nonfinite_max_rollbacks=2)" in message
    assert "lower train.optimizer.lr (now 0.0005 after 2 rollbacks" in message
    assert "train.nonfinite_max_rollbacks (now 2)" in message
    out = capsys.readouterr().out
    assert out.count("rolled back to step 0") == 2 and "x0.5, now 0.001 (vae)" in out and "now 0.0005 (vae)" in out
    steps = sorted(name for name in os.listdir(spec.run_dir) if name.startswith("step-"))
    assert steps == [step_dir_name(0)]  # the initial state, written by fit


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
        assert not guard.allows_update("discriminator", torch.tensor(True), same, lambda skip: "net.0.weight")
        assert guard.allows_update("generator", torch.tensor(False), same, lambda: None)
    with pytest.raises(NonFiniteFound) as raised:
        guard.allows_update("discriminator", torch.tensor(True), same, lambda skip: "net.0.weight")
    assert (raised.value.finding.network, raised.value.finding.consecutive) == ("discriminator", 3)
    assert guard.skipped == 2


def test_a_rollback_forgets_what_an_abandoned_step_left(tmp_path):
    """A backward whose step never came (another network's step rolled back first): its
    gradients and its loss flag must not reach the first step after the restore."""
    engine = Engine(_spec(tmp_path, "train.nonfinite=rollback"), print_fn=None)
    params = list(engine.strategy.unwrap("vae").parameters())
    engine.ctx.backward(sum(p.sum() for p in params) * float("nan"), "vae")
    assert all(p.grad is not None for p in params)
    engine.strategy.drop_gradients()
    assert all(p.grad is None for p in params)
    engine.optimizer_step(engine.train_batches())  # no stale flag: no NonFiniteRollback
    assert engine.step == 1 and all(torch.isfinite(value).all() for value in _weights(engine).values())


def test_the_sentinel_leaves_a_good_steps_gradients_bit_for_bit():
    """Under DDP the guard adds flag * (one element of the smallest parameter) to the loss;
    for a finite loss the flag is 0: the same loss and the same gradients, exactly."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    x = torch.randn(16, 5)
    plain_loss = net(x).pow(2).mean()
    plain = torch.autograd.grad(plain_loss, list(net.parameters()))
    guard = NonFiniteGuard()
    guard.gradients_shared = True
    guarded_loss = guard.record_loss("net", net(x).pow(2).mean(), net.named_parameters)
    guarded = torch.autograd.grad(guarded_loss, list(net.parameters()))
    assert torch.equal(plain_loss, guarded_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded))
    # A bad loss: the sentinel (the smallest parameter, "2.bias") gets a NaN gradient.
    bad = guard.record_loss("net", net(x).pow(2).mean() + float("inf"), net.named_parameters)
    grads = dict(zip([k for k, _ in net.named_parameters()], torch.autograd.grad(bad, list(net.parameters()))))
    assert torch.isnan(grads["2.bias"]).all()
    assert all(torch.isfinite(g).all() for k, g in grads.items() if k != "2.bias")


def test_a_lowered_lr_is_used_when_the_run_continues_from_a_checkpoint(tmp_path, capsys):
    """The advice after a stop is a lower train.optimizer.lr: the run continues from its
    checkpoint at that rate, not at the one the checkpoint's optimizer state carries."""
    spec = _spec(tmp_path, "checkpoint.every=2")
    Engine(spec, print_fn=None).fit()
    folder = os.path.join(spec.run_dir, step_dir_name(4))

    same = Engine(spec, print_fn=print)
    same.restore(folder)
    assert "learning rate changed" not in capsys.readouterr().out
    assert same.strategy.base_lr("vae") == pytest.approx(2e-3)

    lowered = Engine(_spec(tmp_path, "checkpoint.every=2", "train.optimizer.lr=5e-4"), print_fn=print)
    lowered.restore(folder)
    out = capsys.readouterr().out
    assert "learning rate changed since step 4: vae 0.002 -> 0.0005 (the spec's)" in out, out
    assert lowered.strategy.base_lr("vae") == pytest.approx(5e-4)
    assert lowered.strategy.lr("vae") == pytest.approx(same.strategy.lr("vae") / 4)  # same schedule position
    assert lowered.step == same.step == 4
    batches = lowered.train_batches()
    lowered.optimizer_step(batches)  # trains on at that rate
    assert lowered.strategy.base_lr("vae") == pytest.approx(5e-4)


def test_the_stop_says_where_a_rerun_continues(tmp_path):
    from gentrain.nonfinite import where_a_rerun_continues

    spec = _spec(tmp_path, "checkpoint.every=2")
    assert where_a_rerun_continues(spec.run_dir) == ("No checkpoint was written before it: run again with "
                                                     "the fix to start from step 0.")
    engine = Engine(spec, print_fn=None)
    _poison(engine, {3})  # step 4 fails, after the step-2 checkpoint
    with pytest.raises(NonFiniteError, match="at step 4 in network 'vae'"):
        engine.fit()
    folder = os.path.join(spec.run_dir, step_dir_name(2))
    assert where_a_rerun_continues(spec.run_dir).startswith(
        f"Run again with the fix to continue from step 2 ({folder}), the newest good checkpoint")
