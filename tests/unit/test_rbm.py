"""The RBM family: free energy and log Z against brute-force sums over (v, h) on a 10x6 RBM,
AIS's log Z within its error bars, the CD surrogate's gradient against the textbook CD update,
and learning on binarized 8x8 digits through the engine (held-out AIS NLL in nats)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gentrain.data.index import load_index
from gentrain.data.pipeline import eval_batches, train_batches
from gentrain.engine import Engine
from gentrain.registry import DataInfo, SampleRequest, job_config
from gentrain.samplers import RBMParams
from gentrain.validation import from_dict, load_spec
from gentrain_jobs.rbm import JOB, RBMConfig, RBMSampler, binarize, evaluate, sample
from gentrain_jobs.rbm.model import RBM, ais_log_z, base_log_z, exact_log_z

VISIBLE, HIDDEN = 10, 6


def states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def tiny_rbm(scale: float = 1.0, seed: int = 0) -> RBM:
    torch.manual_seed(seed)
    model = RBM((1, 2, 5), HIDDEN).double()
    with torch.no_grad():
        model.weight.normal_(0, scale)
        model.visible_bias.normal_(0, scale)
        model.hidden_bias.normal_(0, scale)
    return model


def joint_negative_energy(model: RBM) -> torch.Tensor:
    """-E(v, h) for every (v, h): [2^V, 2^H], straight from the energy's definition."""
    v, h = states(VISIBLE), states(HIDDEN)
    return ((v @ model.visible_bias)[:, None] + (h @ model.hidden_bias)[None, :]
            + v @ model.weight @ h.T).detach()


def test_free_energy_and_log_partition_match_brute_force_sums():
    model = tiny_rbm()
    joint = joint_negative_energy(model)
    assert torch.allclose(model.free_energy(states(VISIBLE)).detach(), -torch.logsumexp(joint, 1))
    exact = float(torch.logsumexp(joint.flatten(), 0))
    assert exact_log_z(model.params()) == pytest.approx(exact, abs=1e-9)  # the hidden-side sum
    wide = RBMParams(model.weight.T, model.hidden_bias, model.visible_bias)  # the visible-side sum
    assert exact_log_z(wide) == pytest.approx(exact, abs=1e-9)


def test_base_log_z_is_the_partition_function_of_the_bias_only_model():
    bias = torch.randn(VISIBLE, dtype=torch.float64)
    params = RBMParams(torch.zeros(VISIBLE, HIDDEN, dtype=torch.float64), bias, torch.zeros(HIDDEN, dtype=torch.float64))
    assert base_log_z(bias, HIDDEN) == pytest.approx(exact_log_z(params), abs=1e-9)


@pytest.mark.parametrize("scale,schedule", [(0.5, "linear"), (1.5, "linear"), (1.5, "salakhutdinov")])
def test_ais_log_z_matches_the_exact_value_within_its_error_bars(scale, schedule):
    model = tiny_rbm(scale)
    exact = exact_log_z(model.params())
    base = torch.logit(torch.linspace(0.2, 0.8, VISIBLE, dtype=torch.float64))
    result = ais_log_z(model.params(), base, betas=500, chains=200, generator=torch.Generator().manual_seed(0),
                       schedule=schedule)
    print(f"scale {scale}, {schedule}: AIS {result.log_z:.4f} +- {result.log_z_stderr:.4f}, exact {exact:.4f}")
    assert 0 < result.log_z_stderr < 0.1
    assert abs(result.log_z - exact) < 3 * result.log_z_stderr + 1e-3


def test_the_cd_surrogate_gradient_is_the_textbook_cd_update():
    """d/dθ [mean F(v_data) - mean F(v_model)] = -(<v h>_data - <v h>_model) for W, with
    h replaced by p(h = 1 | v); likewise for the biases."""
    model = tiny_rbm(0.5)
    gen = torch.Generator().manual_seed(1)
    data = (torch.rand(16, VISIBLE, generator=gen) < 0.4).double()
    model.zero_grad()
    data_f, model_f, negatives = model(data, data, 3, torch.Generator().manual_seed(2))
    (data_f.mean() - model_f.mean()).backward()
    ph_data = torch.sigmoid(data @ model.weight + model.hidden_bias).detach()
    ph_model = torch.sigmoid(negatives @ model.weight + model.hidden_bias).detach()
    update_w = data.T @ ph_data / 16 - negatives.T @ ph_model / 16
    assert torch.allclose(-model.weight.grad, update_w)
    assert torch.allclose(-model.visible_bias.grad, data.mean(0) - negatives.mean(0))
    assert torch.allclose(-model.hidden_bias.grad, ph_data.mean(0) - ph_model.mean(0))
    assert not torch.equal(negatives, data)


def test_debug_spec_loads_and_sampling_gives_images_in_the_unit_interval():
    spec = load_spec("rbm/debug")
    config = job_config(spec)
    assert isinstance(config, RBMConfig) and config.hidden == 64
    model = RBM((1, 8, 8), 16)
    images = sample({"rbm": model}, config, SampleRequest(5, torch.Generator().manual_seed(0), RBMSampler(steps=3)))
    assert images.shape == (5, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    again = sample({"rbm": model}, config, SampleRequest(5, torch.Generator().manual_seed(0), RBMSampler(steps=3)))
    assert torch.equal(images, again)


# -- it learns ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_index("builtin:digits")


@pytest.mark.parametrize("persistent", [False, True])
def test_learns_binarized_digits_through_the_engine(digits, persistent):
    """Held-out NLL (nats per image, log Z by AIS) from the untrained 64 log 2 = 44.4 to below
    the independent-Bernoulli baseline of the data's pixel marginals (CD-1: 20.4, PCD: 23.1, baseline 25.4)."""
    spec = from_dict({"job": {"type": "rbm"}, "train": {"steps": 300, "optimizer": {"name": "sgd", "lr": 0.1,
                                                                                      "momentum": 0.9},
                                                         "schedule": {"name": "constant"}}})
    config = RBMConfig(hidden=32, cd_steps=1, persistent=persistent, binarize="threshold", ais_betas=300,
                       ais_chains=50)
    engine = Engine(spec, config, data_info=DataInfo(tuple(digits.shape)), print_fn=None)
    held_out = next(iter(eval_batches(digits, "test", 256, 0, 1)))

    def held_out_metrics():
        with engine.strategy.evaluation() as modules:
            return evaluate(modules, config, held_out, torch.Generator().manual_seed(0))

    batches = train_batches(digits, "train", 32, rank=0, world_size=1, seed=0)
    metrics = engine.optimizer_step(batches)
    start = held_out_metrics()
    for _ in range(299):
        metrics = engine.optimizer_step(batches)
    end = held_out_metrics()
    print(f"persistent={persistent}: held-out NLL {start['nll']:.2f} -> {end['nll']:.2f} nats "
          f"(baseline {end['baseline_nll']:.2f}, log Z +- {end['log_z_stderr']:.3f})")
    assert math.isfinite(metrics["loss"])
    assert start["nll"] > 40.0
    assert end["nll"] < end["baseline_nll"] - 2.0 and end["log_z_stderr"] < 0.5


def test_resume_keeps_the_data_marginals_and_the_held_out_nll(digits, tmp_path):
    """The AIS base's data marginals are buffers in the checkpoint: a restored engine reports
    the same held-out NLL; PCD's chains are not saved and restart from the next batch."""
    spec = from_dict({"job": {"type": "rbm", "config": {"hidden": 8, "persistent": True, "ais_betas": 50,
                                                        "ais_chains": 10}},
                      "train": {"steps": 4, "optimizer": {"name": "sgd", "lr": 0.1}}, "storage_path": str(tmp_path)})
    info = DataInfo(tuple(digits.shape))
    engine = Engine(spec, data_info=info, print_fn=None)
    engine.optimizer_step(train_batches(digits, "train", 16, rank=0, world_size=1, seed=0))
    engine.save(tmp_path / "step")
    held_out = next(iter(eval_batches(digits, "test", 64, 0, 1)))
    config = job_config(spec)

    def nll(e):
        with e.strategy.evaluation() as modules:
            return evaluate(modules, config, held_out, torch.Generator().manual_seed(0))["nll"]

    restored = Engine(spec, data_info=info, print_fn=None)
    assert restored.strategy.unwrap("rbm").data_count == 0
    restored.restore(tmp_path / "step")
    model = restored.strategy.unwrap("rbm")
    assert float(model.data_count) == 16 and model.chains is None
    assert nll(restored) == pytest.approx(nll(engine), abs=1e-9)
    restored.optimizer_step(train_batches(digits, "train", 16, rank=0, world_size=1, seed=7))
    assert model.chains is not None and float(model.data_count) == 32


def test_the_eval_line_shows_the_held_out_nll(digits, tmp_path):
    """The printed eval line puts the job type's likelihoods first: alphabetical order alone
    filled the line with baseline_nll, free_energy, log_z, log_z_stderr and left nll, the
    number the README quotes, to MLflow."""
    spec = from_dict({"job": {"type": "rbm", "config": {"hidden": 8, "ais_betas": 20, "ais_chains": 4},
                              "sampling": {"steps": 2}},
                      "data": {"source": "builtin:digits"}, "eval": {"num_samples": 4, "max_batches": 1},
                      "train": {"steps": 2}, "storage_path": str(tmp_path)})
    lines = []
    engine = Engine(spec, data_info=DataInfo(tuple(digits.shape)), print_fn=lines.append)
    engine.evaluate()
    line = next(line for line in lines if line.startswith("eval at step 0"))
    assert line.startswith("eval at step 0 | baseline_nll ") and " | nll " in line, line
