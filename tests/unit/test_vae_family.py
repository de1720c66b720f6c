"""The VAE family's mathematics on its own and on a tiny VAE trained here on 8x8 digits:
KL annealing, free bits, the discretized logistic, IWAE vs ELBO, collapse monitors,
visuals and anomaly scores through `gentrain score`'s own code path."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gentrain.data.index import load_index
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import eval_batches, train_batches
from gentrain.engine import Engine
from gentrain.inference import Trained
from gentrain.registry import DataInfo
from gentrain.schema import SpecError
from gentrain.scoring import score_dataset
from gentrain.validation import from_dict, load_spec
from gentrain_jobs.vae import JOB, KLAnneal, VAEConfig, build, evaluate, visuals
from gentrain_jobs.vae.likelihoods import LEVELS, discretized_logistic_log_prob, log_likelihood
from gentrain_jobs.vae.monitors import active_units, evaluation_metrics
from gentrain_jobs.vae.objective import (elbo_terms, free_bits_kl, gaussian_kl, iwae_bound, kl_weight,
                                         log_importance_weights)

TRAIN_STEPS = 300

pytestmark = pytest.mark.usefixtures("one_thread")


# -- KL annealing ------------------------------------------------------------------
def test_kl_weight_schedules():
    assert kl_weight("none", 0, 100) == 1.0
    assert [kl_weight("linear", s, 100, warmup_steps=20) for s in (0, 5, 10, 20, 99)] == [
        0.0, 0.25, 0.5, 1.0, 1.0]
    # 4 cycles of 25 steps; the weight rises over the first half (12.5 steps) of each.
    values = [kl_weight("cyclical", s, 100, cycles=4, ratio=0.5) for s in (0, 5, 10, 15, 24, 25, 30, 99)]
    assert values == pytest.approx([0.0, 0.4, 0.8, 1.0, 1.0, 0.0, 0.4, 1.0])
    with pytest.raises(ValueError, match="not one of none, linear, cyclical"):
        kl_weight("cosine", 0, 100)


def test_linear_anneal_without_warmup_is_a_spec_error():
    with pytest.raises(SpecError, match="warmup_steps is 0"):
        load_spec("vae/debug", ["job.config.kl_anneal.schedule=linear"])


# -- free bits -----------------------------------------------------------------------
def test_free_bits_floor_is_exact_and_stops_gradients_below_it():
    torch.manual_seed(0)
    # Dimension scales chosen so some batch-mean KLs lie under the floor and some above.
    mean = (torch.randn(16, 6) * torch.tensor([0.05, 2.0, 0.1, 1.5, 0.02, 3.0])).requires_grad_()
    log_var = (torch.randn(16, 6) * 0.05).requires_grad_()
    floor = 0.5
    kl_per_dim = gaussian_kl(mean, log_var)
    term = free_bits_kl(kl_per_dim, floor)
    per_dim_mean = kl_per_dim.detach().mean(0)
    expected = torch.maximum(per_dim_mean, torch.tensor(floor)).sum()
    assert torch.equal(term.detach(), expected)
    below = per_dim_mean < floor
    assert below.any() and (~below).any()
    term.backward()
    assert (mean.grad[:, below] == 0).all() and (log_var.grad[:, below] == 0).all()
    assert (mean.grad[:, ~below].abs().sum(0) > 0).all()


def test_free_bits_changes_the_loss_but_not_the_reported_kl():
    from gentrain_jobs.vae.model import ConvVAE

    torch.manual_seed(1)
    model = ConvVAE((1, 8, 8), 4, [8, 8], "bernoulli")
    x = torch.rand(5, 1, 8, 8)
    noise = torch.randn(5, 4)
    plain = elbo_terms(model, x, "bernoulli", noise=noise)
    floored = elbo_terms(model, x, "bernoulli", beta=2.0, noise=noise, free_bits=1.0)
    torch.testing.assert_close(floored["kl"], plain["kl"])
    torch.testing.assert_close(floored["elbo"], plain["elbo"])
    mean, log_var = model.encode(x)
    expected = -plain["reconstruction"].mean() + 2.0 * free_bits_kl(gaussian_kl(mean, log_var), 1.0)
    torch.testing.assert_close(floored["loss"].mean(), expected)


# -- discretized logistic ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discretized_logistic_sums_to_one_over_256_levels(dtype):
    torch.manual_seed(2)
    levels = torch.arange(LEVELS, dtype=dtype) / (LEVELS - 1)
    means = torch.tensor([-0.3, 0.0, 0.2, 0.5, 0.97, 1.0, 1.4], dtype=dtype)
    for log_scale in (-7.0, -4.5, -2.0, 0.0, 1.0):
        log_p = discretized_logistic_log_prob(levels[:, None], means[None, :],
                                              torch.full_like(means, log_scale)[None, :])
        total = torch.logsumexp(log_p, dim=0).exp()
        # Bins under 1e-5 use the density at the centre times the width (an approximation
        # that keeps fp32 finite), hence the few-1e-6 slack even in float64.
        tolerance = 1e-5 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(total, torch.ones_like(total), atol=tolerance, rtol=0)


def test_discretized_logistic_is_the_log_of_the_bin_probability():
    torch.manual_seed(3)
    x = torch.randint(0, LEVELS, (500,), dtype=torch.float64) / (LEVELS - 1)
    x[:3] = torch.tensor([0.0, 1.0, 1 / 255], dtype=torch.float64)
    mean = torch.rand(500, dtype=torch.float64) * 1.2 - 0.1
    log_scale = torch.rand(500, dtype=torch.float64) * 3 - 4.0
    scale, half = log_scale.exp(), 0.5 / 255

    def cdf(value):
        return torch.sigmoid((value - mean) / scale)

    upper = torch.where(x > 1 - half, torch.ones_like(x), cdf(x + half))
    lower = torch.where(x < half, torch.zeros_like(x), cdf(x - half))
    mass = upper - lower
    expected = torch.log(mass)
    ours = discretized_logistic_log_prob(x, mean, log_scale)
    exact = mass > 1e-5  # where the function takes the difference of CDFs
    assert exact.sum() > 100 and (~exact).sum() > 10
    torch.testing.assert_close(ours[exact], expected[exact], atol=1e-7, rtol=1e-7)
    # Far tails: the centre-density estimate, still a tiny probability and finite.
    assert torch.isfinite(ours).all() and (ours[~exact] < math.log(2e-5)).all()
    images = x[:48].view(3, 1, 4, 4)
    summed = log_likelihood(images, mean[:48].view(3, 1, 4, 4), "logistic", log_scale[:48].view(3, 1, 4, 4))
    torch.testing.assert_close(summed, ours[:48].view(3, 16).sum(1))


def test_sampler_temperature_scales_the_prior():
    from gentrain.registry import SampleRequest
    from gentrain_jobs.vae import VAESampler, sample

    torch.manual_seed(0)
    config = VAEConfig(latent_dim=4, channels=[8, 8])
    modules = build(config, DataInfo((1, 8, 8)))

    def draw(temperature):
        return sample(modules, config, SampleRequest(16, torch.Generator().manual_seed(0), VAESampler(temperature)))

    cold, warm = draw(1e-6), draw(1.0)
    assert cold.shape == (16, 1, 8, 8) and torch.allclose(cold, cold[:1].expand_as(cold), atol=1e-4)
    assert warm.std(dim=0).mean() > 10 * cold.std(dim=0).mean()
    assert torch.equal(draw(1.0), warm)  # the request's generator is the only randomness


def test_logistic_vae_shapes_and_finite_elbo():
    torch.manual_seed(4)
    model = build(VAEConfig(latent_dim=6, likelihood="logistic", iwae_samples=4), DataInfo((3, 32, 32)))["vae"]
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255
    decoded, _, _, log_scale = model(x)
    assert decoded.shape == log_scale.shape == (2, 3, 32, 32)
    config = VAEConfig(latent_dim=6, likelihood="logistic", iwae_samples=4)
    metrics = evaluate({"vae": model}, config, {"image": x}, torch.Generator().manual_seed(0))
    assert math.isfinite(metrics["elbo"]) and math.isfinite(metrics["iwae"])
    # 8-bit data: bits/dim of a discrete model are at most those of a uniform over 256 levels
    # plus whatever the untrained network wastes; finite and positive is what holds here.
    assert metrics["nll_bits_per_dim"] > 0


# -- a tiny VAE trained on digits ----------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_index("builtin:digits")


@pytest.fixture(scope="module")
def trained(digits):
    """Trained by the family's own train_step through the engine (single-process DDP),
    with a linear KL warm-up over the first 50 steps."""
    spec = from_dict({"job": {"type": "vae"}, "train": {"steps": TRAIN_STEPS, "optimizer": {"name": "adam", "lr": 2e-3},
                                "schedule": {"name": "constant"}}})
    config = VAEConfig(latent_dim=8, channels=[32, 64], iwae_samples=8,
                       kl_anneal=KLAnneal(schedule="linear", warmup_steps=50))
    engine = Engine(spec, config, data_info=DataInfo(tuple(digits.shape)), print_fn=None)
    batches = train_batches(digits, "train", 64, rank=0, world_size=1, seed=0)
    weights = []
    for _ in range(TRAIN_STEPS):
        metrics = engine.optimizer_step(batches)
        weights.append(metrics["kl_weight"])
    assert weights[0] == 0.0 and weights[25] == 0.5 and weights[-1] == 1.0
    assert metrics["loss"] == pytest.approx(-metrics["elbo"], rel=1e-6)  # weight 1, no free bits
    return engine.strategy.unwrap("vae").eval()


@pytest.fixture(scope="module")
def held_out(digits):
    return next(iter(eval_batches(digits, "test", 128, 0, 1)))["image"]


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(trained, held_out):
    """E[IWAE_k] estimated from one pool of 1000 importance weights per image, split
    into 1000/k groups of k: each group of k is the union of groups of k/10, so the
    ordering is Burda et al.'s argument applied to these very samples."""
    x = held_out[:64]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mean, log_var = trained.encode(x)
        analytic_elbo = torch.stack([
            elbo_terms(trained, x, "bernoulli", noise=torch.randn(mean.shape, generator=generator))["elbo"]
            for _ in range(50)]).mean()
        log_weights = log_importance_weights(trained, x, 1000, chunk=250, generator=generator)
    bounds = {}
    for k in (1, 10, 100, 1000):
        groups = log_weights.view(1000 // k, k, -1)
        bounds[k] = float((torch.logsumexp(groups, dim=1) - math.log(k)).mean())
    print(f"elbo {float(analytic_elbo):.3f} iwae " + " ".join(f"k={k}: {v:.3f}" for k, v in bounds.items()))
    assert bounds[1] == pytest.approx(float(analytic_elbo), abs=0.1)  # k = 1 estimates the ELBO
    assert bounds[1] < bounds[10] < bounds[100] < bounds[1000]
    assert bounds[1000] > float(analytic_elbo) + 0.05


def test_collapse_monitors_on_the_trained_model(trained, held_out):
    metrics = evaluation_metrics(trained, held_out, 8, 4, torch.Generator().manual_seed(0))
    print({k: round(v, 3) for k, v in metrics.items()})
    per_dim = [metrics[f"kl_dim/{d:02d}"] for d in range(8)]
    assert sum(per_dim) == pytest.approx(metrics["kl"], rel=1e-4)
    assert 1 <= metrics["active_units"] <= 8
    assert metrics["iwae"] >= metrics["elbo"] - 0.5
    assert metrics["nll_bits_per_dim"] == pytest.approx(-metrics["iwae"] / (64 * math.log(2)), rel=1e-5)
    # The job type's evaluate reads k from the config it is given; 0 skips the bound.
    batch = {"image": held_out[:16]}
    assert "iwae" in evaluate({"vae": trained}, VAEConfig(iwae_samples=8), batch, torch.Generator())
    assert "iwae" not in evaluate({"vae": trained}, VAEConfig(iwae_samples=0), batch, torch.Generator())
    # A latent that never moves is inactive, whatever its scale elsewhere.
    means = torch.randn(100, 3)
    means[:, 1] = 0.5
    assert active_units(means) == 2


def test_visuals_grids(trained, held_out):
    grids = visuals({"vae": trained}, VAEConfig(), {"image": held_out[:32]}, torch.Generator().manual_seed(0))
    reconstructions = grids["reconstructions"]
    assert reconstructions.shape == (64, 1, 8, 8)
    torch.testing.assert_close(reconstructions[0::2], held_out[:32])
    assert grids["traversals"].shape == (64, 1, 8, 8)
    assert grids["interpolations"].shape == (64, 1, 8, 8)
    for images in grids.values():
        assert images.min() >= 0 and images.max() <= 1
    # One held-out image has no pairs: only the traversals remain (an empty grid would fail).
    assert list(visuals({"vae": trained}, VAEConfig(), {"image": held_out[:1]}, None)) == ["traversals"]


def _pack_out_of_distribution(digits_test: torch.Tensor, folder: Path) -> str:
    """Inverted digits and uniform noise, packed as a data set of their own."""
    rng = np.random.default_rng(0)
    inverted = 1.0 - digits_test.numpy()[:64, 0]
    noise = rng.random((64, 8, 8))
    images = (np.concatenate([inverted, noise]) * 255).round().astype(np.uint8)
    labels = np.repeat([0, 1], 64).astype(np.int64)  # 0 = inverted, 1 = noise
    path = folder / "ood.npz"
    np.savez(path, x_train=images[:2], y_train=labels[:2], x_test=images, y_test=labels)
    pack_source(str(path), folder / "ood", per_shard=64, progress=False)
    return str(folder / "ood")


def _read_scores(path: Path) -> dict[str, np.ndarray]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {column: np.array([float(r[column]) for r in rows]) for column in ("neg_elbo", "reconstruction_error")} | {
        "label": np.array([int(r["label"]) for r in rows])}


def test_in_distribution_digits_score_lower_than_out_of_distribution(trained, held_out, tmp_path):
    scorer = Trained(spec=None, job=JOB, config=VAEConfig(), modules={"vae": trained},
                     checkpoint=tmp_path, step=TRAIN_STEPS, mlflow_run_id=None)
    rows, columns = score_dataset(scorer, "builtin:digits", "test", str(tmp_path / "id.csv"))
    assert columns == ["neg_elbo", "reconstruction_error"] and rows > 100
    ood = _pack_out_of_distribution(held_out, tmp_path)
    score_dataset(scorer, ood, "test", str(tmp_path / "ood.csv"))
    inside, outside = _read_scores(tmp_path / "id.csv"), _read_scores(tmp_path / "ood.csv")
    for kind in (0, 1):  # inverted digits, then noise
        chosen = outside["label"] == kind
        print(f"kind {kind}: neg_elbo id {inside['neg_elbo'].mean():.2f} vs ood "
              f"{outside['neg_elbo'][chosen].mean():.2f}; recon error id "
              f"{inside['reconstruction_error'].mean():.3f} vs "
              f"{outside['reconstruction_error'][chosen].mean():.3f}")
        assert inside["neg_elbo"].mean() < outside["neg_elbo"][chosen].mean()
        assert inside["reconstruction_error"].mean() < outside["reconstruction_error"][chosen].mean()


@pytest.mark.parametrize("name, shape", [("vae/mnist", (1, 28, 28)), ("vae/cifar10", (3, 32, 32)),
                                         ("vae/imagenet64", (3, 64, 64))])
def test_real_specs_build_networks_for_their_data(name, shape, tmp_path, monkeypatch):
    from gentrain.metrics.inception_weights import WEIGHTS_ENV
    from gentrain.schema import SpecError
    from gentrain.registry import job_config

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # nor the default ~/.cache/gentrain place
    if name != "vae/mnist":  # 32x32 and 64x64 specs measure FID under Inception (50k samples)
        with pytest.raises(SpecError, match="eval.inception_weights"):
            load_spec(name)
        weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
        weights.write_bytes(b"only its presence is checked at validation")
        monkeypatch.setenv(WEIGHTS_ENV, str(weights))
        assert load_spec(name).eval.fid_samples == 50_000
    spec = load_spec(name)
    config = job_config(spec)
    assert config.iwae_samples == 1000
    model = build(config, DataInfo(shape))["vae"]
    with torch.no_grad():
        decoded, mean, _, log_scale = model(torch.rand(1, *shape))
    assert decoded.shape == (1, *shape) and mean.shape == (1, config.latent_dim)
    if config.likelihood == "logistic":
        assert log_scale.shape == decoded.shape
