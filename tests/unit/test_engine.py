"""The training engine in one process, no Ray: fit, save, restore, sample.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_engine.py -q
"""

from pathlib import Path

import pytest
import torch

import gentrain
import gentrain.inference
from gentrain.checkpoint import latest_checkpoint, step_dir_name
from gentrain.engine import Engine
from gentrain.schema import SpecError

STEPS = 6


@pytest.fixture
def spec(tmp_path):
    return gentrain.load("vae/debug", [f"train.steps={STEPS}", "train.schedule.warmup_steps=2", "train.log_every=2", "checkpoint.every=3",
                                       "eval.every=0", "eval.num_samples=4", "eval.max_batches=1",
                                       f"storage_path={tmp_path}", "tracking.enabled=false"])


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    return engine.strategy.export_state_dicts()["vae"]


def test_fit_restore_continue_equals_uninterrupted(spec, capsys):
    straight = Engine(spec)
    straight.fit()  # checkpoints step-3 and step-6 into <storage_path>/vae-debug/
    expected = _weights(straight)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == \
        ["step 2/6", "step 4/6", "step 6/6"]
    assert any(line.startswith("eval at step 0 | ") for line in lines)
    halfway = f"{spec.run_dir}/{step_dir_name(3)}"

    resumed = Engine(spec)
    meta = resumed.restore(halfway)
    assert (resumed.step, resumed.batches_consumed, meta["world_size"]) == (3, 3, 1)
    resumed.fit()
    assert resumed.step == STEPS and resumed.batches_consumed == STEPS
    for key, value in _weights(resumed).items():
        assert torch.equal(value, expected[key]), key
    assert latest_checkpoint(spec.run_dir)[1]["step"] == STEPS
    grids = sorted(path.name for path in (Path(spec.run_dir) / "samples").glob("*.png"))
    assert grids == [f"{step_dir_name(0)}.png", f"{step_dir_name(STEPS)}.png"]


def test_a_sweep_trial_trained_to_the_end_still_reports_its_evaluation(spec, capsys):
    """A sweep's trial resumed from its final checkpoint (its sweep was interrupted before
    Tune had the final evaluation) evaluates that model and hands it on; without a sweep
    there is nothing to do."""
    Engine(spec).fit()
    final = f"{spec.run_dir}/{step_dir_name(STEPS)}"
    capsys.readouterr()

    plain = Engine(spec)
    plain.restore(final)
    plain.fit()
    assert "nothing to do" in capsys.readouterr().out

    trial = Engine(spec)
    trial.restore(final)
    reported = []
    trial.on_evaluation = lambda engine, metrics: reported.append((engine.step, metrics))
    trial.fit()
    assert [step for step, _ in reported] == [STEPS] and "eval/elbo" in reported[0][1]
    assert trial.step == STEPS and f"already trained {STEPS} of {STEPS} steps; evaluating it" in capsys.readouterr().out


def test_optimizer_steps_accumulate_and_report_grad_norms(spec):
    import dataclasses

    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, grad_accum=2))
    engine = Engine(spec, print_fn=None)
    batches = engine.train_batches()
    metrics = engine.optimizer_step(batches)
    assert engine.step == 1 and engine.batches_consumed == 2
    assert {"loss", "elbo", "grad_norm/vae"} <= set(metrics)
    window_metrics = engine.train_metrics(_window(metrics))
    assert window_metrics["train/loss"] == pytest.approx(metrics["loss"])
    assert "train/lr/vae" in window_metrics


def _window(metrics):
    from gentrain.progress import Window

    window = Window()
    window.add(metrics)
    return window


def test_open_run_samples_a_saved_checkpoint(spec):
    engine = Engine(spec, print_fn=None)
    batches = engine.train_batches()
    for _ in range(2):
        engine.optimizer_step(batches)
    engine.save(f"{spec.run_dir}/{step_dir_name(engine.step)}")
    trained = gentrain.open_run(spec.run_dir)  # the run folder: its latest checkpoint
    assert trained.step == 2
    first, again = trained.sample(5, seed=1), trained.sample(5, seed=1)
    assert first.shape == (5, 1, 8, 8) and torch.equal(first, again)
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    # The engine's own sampler draws the same from the same weights (no EMA in the VAE).
    assert torch.equal(engine.sample(5, seed=1), first)
    assert trained.data_info == engine.data_info and trained.data_info.kind == "image"
    # job.sampling from the spec, then --set on top (what `gentrain sample --set` passes)
    assert trained.sampler.temperature == 1.0
    cooler = gentrain.inference.load_trained(spec.run_dir, sampling=["temperature=0.5"])
    assert cooler.sampler.temperature == 0.5 and not torch.equal(cooler.sample(5, seed=1), first)
    with pytest.raises(SpecError, match="job.sampling.temprature: unknown key; did you mean 'temperature'"):
        gentrain.inference.load_trained(spec.run_dir, sampling=["temprature=0.5"])


def test_time_budget_ends_fit_as_train_steps_would(tmp_path, capsys):
    # A budget far below one step's time: spent at the first check (the first log step, 2).
    spec = gentrain.load("vae/debug", [f"train.steps={STEPS}", "train.schedule.warmup_steps=2", "train.log_every=2",
                                       "checkpoint.every=100", "eval.every=0", "eval.num_samples=4",
                                       "eval.max_batches=1", f"storage_path={tmp_path}", "tracking.enabled=false",
                                       "train.max_time=0.001"])
    engine = Engine(spec)
    engine.fit()
    assert (engine.step, engine.stopped_at_time_budget) == (2, True)
    lines = capsys.readouterr().out.splitlines()
    assert "stopped at the time budget (train.max_time=0.001) after 2 steps" in lines
    assert any(line.startswith("eval at step 2 | ") for line in lines)  # the final evaluation
    folder, meta = latest_checkpoint(spec.run_dir)  # the final checkpoint, though checkpoint.every=100
    assert (meta["step"], meta["stopped_at_time_budget"]) == (2, True)
    grids = sorted(path.name for path in (Path(spec.run_dir) / "samples").glob("*.png"))
    assert grids == [f"{step_dir_name(0)}.png", f"{step_dir_name(2)}.png"]


@pytest.mark.parametrize("value", ["0", "-5s", "5 minutes", "nan"])
def test_time_budget_is_checked_and_named(value):
    with pytest.raises(SpecError, match=r"train\.max_time: .* is not a time budget"):
        gentrain.load("vae/debug", [f"train.max_time={value}"])
    assert gentrain.load("vae/debug", ["train.max_time=1.5m"]).train.max_seconds == 90.0
    assert gentrain.load("vae/debug", ["train.max_time=90"]).train.max_seconds == 90.0


def test_no_evaluation_at_the_start_when_asked(spec, capsys):
    """eval.at_start=false: no evaluation (nor its grid) before the first step; the one at
    the end stays."""
    import dataclasses

    spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, at_start=False))
    Engine(spec).fit()
    evaluations = [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("eval at")]
    assert evaluations == [f"eval at step {STEPS}"]
    assert sorted(path.name for path in (Path(spec.run_dir) / "samples").glob("*.png")) == [f"{step_dir_name(STEPS)}.png"]

