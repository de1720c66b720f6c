"""`gentrain bench e2e`'s reading of the timeline marks, and what its models give each side:
the cifar10-vae's synthetic set as gentrain reads it is the plain script's tensor. Nothing
here is timed: the runs themselves are too slow for the suite (`gentrain bench e2e --rounds
1 --steps 60` and `--model cifar10-vae --rounds 1 --steps 30` are the manual smoke runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gentrain.bench import e2e
from gentrain.timeline import TIMELINE_ENV, mark, read


def test_marks_append_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.delenv(TIMELINE_ENV, raising=False)
    mark("nothing")
    assert not path.exists()
    monkeypatch.setenv(TIMELINE_ENV, str(path))
    mark("first_step", step=1)
    mark("step", step=25)
    assert [(m["event"], m.get("step")) for m in read(str(path))] == [("first_step", 1), ("step", 25)]


def _marks(started):
    return [{"event": "cli_start", "time": started + 2.0}, {"event": "ray_started", "time": started + 12.0},
            {"event": "worker_start", "time": started + 20.0}, {"event": "first_step", "time": started + 21.5},
            {"event": "step", "step": 25, "time": started + 22.0, "cpu": 10.0},
            {"event": "step", "step": 50, "time": started + 22.5, "cpu": 10.5},
            {"event": "step", "step": 75, "time": started + 24.0, "cpu": 11.0}]


def test_steady_rate_phases_and_first_step_from_marks():
    started = 1000.0
    marks = _marks(started)
    assert e2e._steady(marks) == pytest.approx(50 / 2.0)  # steps 25 -> 75 in 2 s
    assert e2e._steady(marks, "cpu") == pytest.approx(50 / 1.0)  # and 1 CPU second
    assert e2e._first(marks, "first_step", started) == pytest.approx(21.5)
    phases = e2e._phases(marks, started)
    assert phases == pytest.approx({"cli_start": 2.0, "ray_started": 10.0, "worker_start": 8.0, "first_step": 1.5})
    assert e2e._steady(marks[:5]) is None  # one progress step: no span


def test_rows_are_per_round_speed_ratios():
    def record(rate, wall, first):
        return {"steady_steps_per_s": rate, "wall_s": wall, "first_step_s": first, "phases": {},
                "load_before": 1.0, "load_after": 2.0}

    runs = {"baseline": [record(100.0, 30.0, 20.0), record(50.0, 60.0, 20.0)],
            "gentrain_plain": [record(90.0, 40.0, 25.0), record(50.0, 60.0, 20.0)],
            "gentrain_spec": [record(80.0, 45.0, 25.0), record(25.0, 60.0, 40.0)]}
    rows = {row["measure"]: row for row in e2e._rows(runs)}
    assert rows["steady steps/s, no eval/ckpt"]["ratios"] == pytest.approx([0.9, 1.0])
    assert rows["steady steps/s, debug spec's eval/ckpt"]["ratio"] == pytest.approx((0.8 + 0.5) / 2)
    assert rows["whole run wall s (debug spec)"]["ratios"] == pytest.approx([30 / 45, 1.0])
    assert rows["time to first step s, no eval/ckpt"]["ratios"] == pytest.approx([0.8, 1.0])
    assert rows["time to first step s (debug spec)"]["ratios"] == pytest.approx([0.8, 0.5])
    table = e2e.format_table({"rows": e2e._rows(runs), "breakdown": [], "machine": {"cpu_count": 2},
                              "settings": {"rounds": 2, "steps": 75, "workers": 2, "batch_size": 32}})
    assert "0.95x" in table and "1.00 to 2.00" in table


def test_every_cli_model_is_a_bench_model():
    from gentrain.bench.e2e_models import MODELS
    from gentrain.cli import build_parser

    bench = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    e2e_parser = next(a for a in bench._actions if a.dest == "bench_command").choices["e2e"]
    assert set(next(a for a in e2e_parser._actions if a.dest == "model").choices) == set(MODELS)


def test_synthetic_images_are_seeded_and_smooth():
    from gentrain.bench.e2e_models import synthetic_images

    images = synthetic_images(8, seed=3)
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)
    assert np.array_equal(images, synthetic_images(8, seed=3))
    assert not np.array_equal(images, synthetic_images(8, seed=4))
    # Neighbouring pixels are close (uniform noise would differ by about 85 on average).
    neighbours = np.abs(np.diff(images.astype(np.int16), axis=2)).mean()
    assert neighbours < 15
    assert images.std() > 40  # and the images are not flat


def test_cifar10_vae_gentrain_trains_on_the_images_the_baseline_holds(tmp_path):
    """The packed synthetic set, read by gentrain's Engine under the bench's overrides, is the
    baseline's in-memory tensor: over one epoch the same images, value for value, in the
    same shape and scale (the order is each side's own shuffle)."""
    from gentrain.bench.baseline_ray_train import load_images
    from gentrain.bench.e2e_models import CPU_OVERRIDES, write_synthetic
    from gentrain.engine import Engine
    from gentrain.validation import load_spec

    npz, packed = write_synthetic(tmp_path, train=100, test=20)
    baseline = load_images("cifar10-vae", data=str(npz))
    assert baseline.shape == (100, 3, 32, 32) and baseline.dtype == torch.float32
    spec = load_spec("vae/cifar10", [f"data.source={packed}", *CPU_OVERRIDES, "train.batch_size=25",
                                     "train.steps=10", "tracking.enabled=false", f"storage_path={tmp_path}"])
    assert not spec.data.augment.flip and spec.eval.metrics == []
    engine = Engine(spec, rank=0, world_size=1, print_fn=None)
    batches = engine.train_batches()
    epoch = [next(batches)["image"] for _ in range(engine.per_epoch(1))]
    assert all(batch.shape == (25, 3, 32, 32) and batch.dtype == torch.float32 for batch in epoch)

    def ordered(images):
        return sorted(bytes(image.numpy().tobytes()) for image in images)

    assert ordered(torch.cat(epoch)) == ordered(baseline)


def test_cifar10_vae_commands_give_both_sides_the_same_run(tmp_path):
    from gentrain.bench.e2e_models import MODELS, Prepared

    model = MODELS["cifar10-vae"]
    prepared = Prepared(2000, ("data.source=/d", "strategy.precision=fp32"), ("--data", "/d.npz"))
    baseline = e2e._command("baseline", 0, tmp_path, 60, 2, 50, model, prepared)
    assert baseline[baseline.index("--model") + 1] == "cifar10-vae"
    assert baseline[baseline.index("--data") + 1] == "/d.npz"
    assert baseline[baseline.index("--lr") + 1] == "0.001" and baseline[baseline.index("--log-every") + 1] == "5"
    plain = e2e._command("gentrain_plain", 0, tmp_path, 60, 2, 50, model, prepared)
    spec_kind = e2e._command("gentrain_spec", 0, tmp_path, 60, 2, 50, model, prepared)
    for command in (plain, spec_kind):
        assert "vae/cifar10" in command and "data.source=/d" in command and "train.log_every=5" in command
    assert plain[-2:] == ["eval.every=0", "checkpoint.every=60"]
    assert spec_kind[-2:] == ["checkpoint.every=20", "eval.every=30"]
    debug = e2e._command("gentrain_spec", 0, tmp_path, 300, 2, 32, MODELS["debug-vae"], Prepared(1617, (), ()))
    assert "vae/debug" in debug and not any(arg.startswith(("eval.every", "checkpoint.every")) for arg in debug)


def test_the_plain_scripts_discretized_logistic_is_the_job_types():
    """The baseline writes the pixel likelihood by hand (the platform never imports a
    family); it is the VAE job type's, value for value, the edge bins and tiny bins too."""
    import torch

    from gentrain.bench.baseline_ray_train import discretized_logistic_log_prob as by_hand
    from gentrain_jobs.vae.likelihoods import discretized_logistic_log_prob as job_types

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=generator).float() / 255.0
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # both edge bins
    mean = torch.rand(x.shape, generator=generator) * 1.2 - 0.1
    log_scale = torch.empty(x.shape).uniform_(-9.0, 0.0, generator=generator)  # tiny to wide bins
    torch.testing.assert_close(by_hand(x, mean, log_scale), job_types(x, mean, log_scale), rtol=0, atol=0)


def test_set_overrides_go_last_on_both_gentrain_runs_and_the_no_eval_run_skips_the_start_evaluation(tmp_path):
    from gentrain.bench.e2e_models import MODELS, Prepared

    prepared, model = Prepared(100, ("data.cache_mb=0",), ("--digits",)), MODELS["debug-vae"]
    extra = ("tracking.enabled=false", "eval.every=7")
    plain, spec, baseline = (e2e._command(kind, 0, tmp_path, 60, 2, 32, model, prepared, extra)
                             for kind in ("gentrain_plain", "gentrain_spec", "baseline"))
    assert plain[-2:] == spec[-2:] == list(extra) and "eval.every=0" in plain  # the later key wins
    assert "eval.at_start=false" in plain and "eval.at_start=false" not in spec
    assert not set(extra) & set(baseline)
    with pytest.raises(Exception, match="eval.at_star: unknown key"):
        e2e.run_e2e_bench(rounds=1, steps=3, keep=str(tmp_path), overrides=("eval.at_star=1",))
