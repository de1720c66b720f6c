"""The flow job type (RealNVP, Glow): invertibility, log-determinants against autograd
Jacobians, ActNorm's data-dependent initialisation, bits/dim by hand, sampling, and that
it learns through the engine."""

import dataclasses
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from gentrain.data.index import load_index
from gentrain.data.pipeline import eval_batches, train_batches
from gentrain.engine import Engine
from gentrain.registry import DataInfo, SampleRequest, job_config
from gentrain.validation import from_dict, load_spec
from gentrain_jobs.flow import (JOB, FlowConfig, FlowSampler, build, evaluate, reconstructions, sample,
                                score, visuals)
from gentrain_jobs.flow.layers import (ActNorm, AffineCoupling, InvConv1x1, Squeeze, pooled_moments,
                                       squeeze2d, unsqueeze2d)
from gentrain_jobs.flow.model import Flow, Split
from gentrain_jobs.flow.objective import bits_per_dim, dequantize, discrete_nll_nats, levels, quantize


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (zero convolutions make couplings the
    identity at first, which would make the checks below trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def initialized_actnorm(channels: int, seed: int = 1) -> ActNorm:
    layer = ActNorm(channels)
    generator = torch.Generator().manual_seed(seed)
    layer.initialize(3.0 * torch.randn(16, channels, 4, 4, generator=generator) + 1.5, reduce=lambda t: t)
    return perturb(layer, 0.2, seed)


def layer_cases():
    """(name, layer, input shape) for every layer type, parameters off their initial values."""
    torch.manual_seed(0)
    return [
        ("actnorm", initialized_actnorm(3), (1, 3, 4, 4)),
        ("invconv-plain", perturb(InvConv1x1(4, lu=False), 0.2), (1, 4, 2, 2)),
        ("invconv-lu", perturb(InvConv1x1(4, lu=True), 0.2), (1, 4, 2, 2)),
        ("coupling-checkerboard-tanh-0", perturb(AffineCoupling(2, (4, 4), "checkerboard", 0, "tanh", "resnet", 8, 1)),
         (1, 2, 4, 4)),
        ("coupling-checkerboard-sigmoid-1", perturb(AffineCoupling(1, (4, 4), "checkerboard", 1, "sigmoid", "cnn", 8, 0)),
         (1, 1, 4, 4)),
        ("coupling-channel-tanh-0", perturb(AffineCoupling(4, (2, 2), "channel", 0, "tanh", "resnet", 8, 1)),
         (1, 4, 2, 2)),
        ("coupling-channel-sigmoid-1", perturb(AffineCoupling(5, (2, 2), "channel", 1, "sigmoid", "cnn", 8, 0)),
         (1, 5, 2, 2)),
        ("squeeze", Squeeze(), (1, 2, 4, 4)),
    ]


CASES = layer_cases()


@pytest.mark.parametrize("name,layer,shape", CASES, ids=[c[0] for c in CASES])
def test_every_layer_inverts_its_forward(name, layer, shape):
    layer.eval()
    x = torch.randn(8, *shape[1:], generator=torch.Generator().manual_seed(3))
    y, _ = layer(x)
    assert not torch.allclose(y.flatten(), x.flatten()) or name == "squeeze"
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,layer,shape", CASES, ids=[c[0] for c in CASES])
def test_every_layer_log_determinant_is_that_of_its_autograd_jacobian(name, layer, shape):
    layer = layer.double().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, logdet = layer(x)
    matrix = jacobian(lambda v: layer(v.view(shape))[0].flatten(), x.flatten())
    sign, expected = torch.linalg.slogdet(matrix)
    assert sign != 0
    torch.testing.assert_close(logdet, expected.reshape(1), rtol=1e-10, atol=1e-10)
    if name == "squeeze":
        assert float(logdet) == 0.0 and float(expected) == pytest.approx(0.0, abs=1e-12)


def test_squeeze_is_a_permutation_and_unsqueeze_its_inverse():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    y = squeeze2d(x)
    assert y.shape == (1, 8, 2, 3)
    assert sorted(y.flatten().tolist()) == x.flatten().tolist()
    assert torch.equal(unsqueeze2d(y), x)
    # channel c * 4 + 2 * di + dj holds pixel (2 i + di, 2 j + dj) of channel c
    assert y[0, 1 * 4 + 2 * 1 + 0, 1, 2] == x[0, 1, 3, 4]


def test_lu_weight_is_its_factors_product_and_starts_a_rotation():
    torch.manual_seed(0)
    layer = InvConv1x1(5, lu=True)
    with torch.no_grad():
        weight, logdet = layer.weight_and_logdet()
    torch.testing.assert_close(weight @ weight.T, torch.eye(5), rtol=0, atol=1e-5)
    assert float(logdet) == pytest.approx(0.0, abs=1e-5)  # |det| of a rotation is 1
    perturb(layer)
    with torch.no_grad():
        weight, logdet = layer.weight_and_logdet()
    assert float(logdet) == pytest.approx(float(torch.linalg.slogdet(weight.double())[1]), abs=1e-5)


# -- whole models ------------------------------------------------------------------------------------
def small_flow(architecture: str, learned_prior: bool = True, preprocess: str = "auto", levels: int = 2,
               shape=(1, 8, 8), seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    config = FlowConfig(architecture=architecture, levels=levels, steps_per_level=2, hidden=8, blocks=1,
                        learned_prior=learned_prior, preprocess=preprocess)
    model = build(config, DataInfo(shape))["flow"]
    model.train()
    model(torch.rand(32, *shape, generator=torch.Generator().manual_seed(seed)))  # ActNorm's data init
    # Moved off its initial values as far as keeps the latents of the size a trained flow
    # gives (|z| < 10 here); far larger moves blow them up to hundreds.
    return perturb(model, 0.05, seed).eval()


MODELS = [("glow", 2, (1, 8, 8)), ("glow", 3, (3, 8, 8)), ("realnvp", 2, (1, 8, 8)), ("realnvp", 3, (2, 8, 8))]


@pytest.mark.parametrize("architecture,levels,shape", MODELS)
def test_whole_multiscale_model_inverts(architecture, levels, shape):
    model = small_flow(architecture, levels=levels, shape=shape)
    y = torch.rand(6, *shape, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    _, latents = model(y)
    assert len(latents) == levels
    assert sum(z[0].numel() for z in latents) == math.prod(shape)  # every dimension ends in a latent
    assert max(float(z.abs().max()) for z in latents) < 10
    torch.testing.assert_close(model.decode(latents), y, rtol=0, atol=1e-5)
    model, y = model.double(), y.double()  # in float64 the inverse is exact to rounding
    torch.testing.assert_close(model.decode(model(y)[1]), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("architecture,levels,shape", [("glow", 2, (1, 4, 4)), ("realnvp", 2, (2, 4, 4))])
def test_whole_model_log_density_is_the_change_of_variables(architecture, levels, shape):
    """N(0, I) priors: log p(y) = sum log N(z) + log|det dz/dy| with the Jacobian of the
    whole map y -> (z_1, ..., z_top) from autograd, preprocessing (logit for realnvp,
    y - 1/2 for glow) included."""
    model = small_flow(architecture, learned_prior=False, levels=levels, shape=shape).double()
    y = torch.rand(1, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.9 + 0.05
    log_density, latents = model(y)
    z = torch.cat([latent.flatten() for latent in latents])
    matrix = jacobian(lambda v: torch.cat([t.flatten() for t in model(v.view(shape)[None])[1]]), y.flatten())
    expected = torch.linalg.slogdet(matrix)[1] + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    torch.testing.assert_close(log_density, expected.reshape(1), rtol=1e-9, atol=1e-9)


def test_split_prior_is_the_gaussian_of_its_predicted_mean_and_std():
    torch.manual_seed(0)
    split = perturb(Split(6, learned=True)).double()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    kept, z, log_prob = split(x)
    h = split.prior(kept)
    normal = torch.distributions.Normal(h[:, 0::2], h[:, 1::2].exp())
    torch.testing.assert_close(log_prob, normal.log_prob(z).flatten(1).sum(1))
    assert torch.equal(torch.cat([kept, z], 1), x)


# -- ActNorm's data-dependent initialisation -------------------------------------------------------------
def test_actnorm_init_gives_zero_mean_unit_variance_per_channel_on_the_init_batch():
    x = torch.randn(64, 3, 5, 5) * torch.tensor([0.1, 2.0, 7.0]).view(1, 3, 1, 1) + torch.tensor([5.0, -1.0, 0.0]).view(1, 3, 1, 1)
    layer = ActNorm(3).train()
    assert not layer.is_initialized()
    y, _ = layer(x)
    assert layer.is_initialized() and int(layer.initialized) == 1
    std, mean = torch.std_mean(y.transpose(0, 1).flatten(1), dim=1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, torch.ones(3), rtol=0, atol=1e-5)
    before = layer.init_bias.clone()
    layer(x * 3 + 1)  # a second batch never initialises again
    assert torch.equal(layer.init_bias, before)


def test_uninitialised_actnorm_in_evaluation_is_the_identity():
    layer = ActNorm(2).eval()
    x = torch.randn(4, 2, 3, 3)
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4)) and not layer.is_initialized()


def test_pooled_moments_across_ranks_are_the_moments_of_the_union():
    """The rule every rank follows (layers.pooled_moments): counts, sums and sums of squares
    summed over ranks. Two 'ranks' with different first batches, the reduce played by hand:
    both get the moments of the union of their batches."""
    first, second = torch.randn(8, 3, 4, 4) * 2 + 1, torch.randn(5, 3, 4, 4) - 3
    local = {}

    def stats(x):
        return pooled_moments(x, reduce=lambda t: local.setdefault(len(local), t.clone()))

    stats(first), stats(second)
    summed = local[0] + local[1]
    results = [pooled_moments(x, reduce=lambda t: summed.clone()) for x in (first, second)]
    union = torch.cat([first, second]).transpose(0, 1).flatten(1).double()
    std, mean = torch.std_mean(union, dim=1, unbiased=False)
    for got_mean, got_std in results:
        torch.testing.assert_close(got_mean, mean)
        torch.testing.assert_close(got_std, std)


def test_initialized_flag_travels_in_the_state_dict_so_a_resume_never_reinitialises():
    trained = ActNorm(2).train()
    trained(torch.randn(16, 2, 3, 3) * 4 + 2)
    resumed = ActNorm(2)
    resumed.load_state_dict(trained.state_dict())
    resumed.train()
    resumed(torch.randn(16, 2, 3, 3))  # a different first batch after the resume
    assert torch.equal(resumed.init_bias, trained.init_bias)
    assert torch.equal(resumed.init_log_scale, trained.init_log_scale)


# -- bits/dim by hand ---------------------------------------------------------------------------------
def identity_flow(preprocess: str) -> Flow:
    """One Glow step whose every layer is the identity: ActNorm uninitialised (evaluation),
    the 1x1 convolution's matrix I, a tanh coupling with zero output (log s = 0, t = 0),
    N(0, I) priors. Its latents are the squeezed preprocessed pixels."""
    config = FlowConfig(architecture="glow", levels=1, steps_per_level=1, hidden=4, invconv="plain",
                        coupling_scale="tanh", learned_prior=False, preprocess=preprocess)
    model = build(config, DataInfo((1, 2, 2)))["flow"].eval()
    with torch.no_grad():
        model.levels[0].layers[2].weight.copy_(torch.eye(4))
    return model


def test_bits_per_dim_of_the_identity_into_a_standard_normal_by_hand():
    """y = (k + u) / 256 - 1/2 ~ N(0, 1) per dimension. k = 128, u = 0: y - 1/2 = 0, so
    log p(y) = D * (-1/2 log 2 pi) and bpd = (1/2 ln(2 pi) + ln 256) / ln 2 = 8 + 1/2 log2(2 pi)
    = 9.3257480..."""
    model = identity_flow("center")
    x = torch.full((1, 1, 2, 2), 128 / 255)
    log_density, _ = model(dequantize(x, torch.zeros_like(x)))
    assert float(bits_per_dim(log_density, 4)) == pytest.approx(9.325748064736159, abs=1e-6)
    # k = 0, u = 1/2: y = 1/512, z = 1/512 - 1/2; bpd = (z^2 / 2 + ln(2 pi) / 2 + ln 256) / ln 2
    x = torch.zeros(1, 1, 2, 2)
    log_density, _ = model(dequantize(x, torch.full_like(x, 0.5)))
    z = 1 / 512 - 1 / 2
    expected = (z * z / 2 + math.log(2 * math.pi) / 2 + math.log(256)) / math.log(2)
    assert float(bits_per_dim(log_density, 4)) == pytest.approx(expected, abs=1e-6)


def test_bits_per_dim_with_the_logit_preprocessing_by_hand():
    """x = logit(a + (1 - 2a) y); log p(y) = log N(x) + log(1 - 2a) - log s - log(1 - s), s = a + (1 - 2a) y.
    y = 1/2 (k = 127, u = 1): s = 1/2, x = 0: per dimension log N(0) + ln 0.9 + 2 ln 2."""
    model = identity_flow("logit")
    x = torch.full((1, 1, 2, 2), 127 / 255)
    log_density, _ = model(dequantize(x, torch.ones_like(x)))
    per_dim = -0.5 * math.log(2 * math.pi) + math.log(1 - 2 * 0.05) + 2 * math.log(2)
    assert float(log_density) == pytest.approx(4 * per_dim, abs=1e-5)
    assert float(bits_per_dim(log_density, 4)) == pytest.approx((-per_dim + math.log(256)) / math.log(2), abs=1e-6)


def test_a_uniform_density_on_the_unit_cube_is_eight_bits_per_dim():
    assert float(bits_per_dim(torch.zeros(1), 3072)) == pytest.approx(8.0, abs=1e-12)


def test_dequantization_cubes_and_quantize_back():
    k = torch.arange(256, dtype=torch.float32)
    x = k / 255
    for u in (0.0, 0.25, 0.999):
        y = dequantize(x, torch.full_like(x, u))
        torch.testing.assert_close(y, (k + u) / 256)
        assert torch.equal(quantize(y), x)


# -- binarized images: num_bits=1 ------------------------------------------------------------------------
def test_two_levels_are_the_top_bit_and_a_binarized_image_is_its_own_pixels():
    j = torch.arange(256, dtype=torch.float32)
    assert torch.equal(levels(j / 255, 2), (j >= 128).float())
    binary = torch.tensor([0.0, 1.0, 1.0, 0.0])  # a binarized image: 8-bit 0 and 255
    for u in (0.0, 0.3, 0.999):
        y = dequantize(binary, torch.full_like(binary, u), 2)
        torch.testing.assert_close(y, (binary + u) / 2)  # the cubes [0, 1/2) and [1/2, 1)
        assert torch.equal(quantize(y, 2), binary)


def test_two_level_nll_is_exact_for_a_density_constant_on_the_cubes():
    """p(y) = prod_i q(y_i) with q = 2a on [0, 1/2) and 2(1 - a) on [1/2, 1): P(k) = prod a or
    (1 - a) exactly (Jensen's bound is tight), so -log p(y) + D ln 2 is -log P(k), and the 2^D
    binary images' probabilities sum to 1 (all 16 of a 2x2 image enumerated)."""
    a, dims = 0.3, 4
    total = 0.0
    for code in range(2 ** dims):
        k = torch.tensor([(code >> i) & 1 for i in range(dims)], dtype=torch.float64)
        y = dequantize(k, torch.rand(dims, generator=torch.Generator().manual_seed(code), dtype=torch.float64), 2)
        log_q = torch.tensor([math.log(2 * a), math.log(2 * (1 - a))], dtype=torch.float64)
        log_p = log_q[(y >= 0.5).long()].sum()
        expected = -sum(math.log(a if bit == 0 else 1 - a) for bit in k.tolist())
        nll = float(discrete_nll_nats(log_p, dims, 2))
        assert nll == pytest.approx(expected, abs=1e-12)
        assert float(bits_per_dim(log_p, dims, 2)) == pytest.approx(expected / (dims * math.log(2)), abs=1e-12)
        total += math.exp(-nll)
    assert total == pytest.approx(1.0, abs=1e-12)
    assert float(bits_per_dim(torch.zeros(1), 784, 2)) == pytest.approx(1.0, abs=1e-12)  # uniform: 1 bit/dim


def test_two_level_nll_of_the_identity_flow_by_hand():
    """num_bits=1, pixel 1, u = 0: y = 1/2, y - 1/2 = 0 ~ N(0, 1): per image
    -log p(y) + D ln 2 = D (ln(2 pi) / 2 + ln 2) nats."""
    model = identity_flow("center")
    config = FlowConfig(num_bits=1)
    x = torch.ones(1, 1, 2, 2)
    metrics = evaluate({"flow": model}, config, {"image": x}, torch.Generator().manual_seed(0))
    u = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    z = (1 + u) / 2 - 0.5
    expected = float((z * z / 2).sum()) + 4 * (math.log(2 * math.pi) / 2 + math.log(2))
    assert metrics["nll"] == pytest.approx(expected, abs=1e-5)
    assert metrics["bits_per_dim"] == pytest.approx(expected / (4 * math.log(2)), abs=1e-6)
    log_density, _ = model(dequantize(x, torch.zeros_like(x), 2))
    assert float(discrete_nll_nats(log_density, 4, 2)) == pytest.approx(4 * (math.log(2 * math.pi) / 2 + math.log(2)),
                                                                        abs=1e-5)


def test_two_level_samples_and_reconstructions_are_binary():
    model = small_flow("realnvp")
    config = FlowConfig(architecture="realnvp", num_bits=1)
    images = sample({"flow": model}, config, SampleRequest(6, torch.Generator().manual_seed(0), FlowSampler(1.0)))
    assert set(images.unique().tolist()) <= {0.0, 1.0}
    x = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    pairs = reconstructions(model.eval(), x, 2)
    assert torch.equal(pairs[0::2], x[:2]) and torch.equal(pairs[1::2], x[:2])


def test_evaluate_reports_the_per_sample_mean_in_bits_and_nats():
    model = identity_flow("center")
    batch = {"image": torch.rand(5, 1, 2, 2)}
    metrics = evaluate({"flow": model}, FlowConfig(), batch, torch.Generator().manual_seed(0))
    noise = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    log_density, _ = model(dequantize(batch["image"], noise))
    assert metrics["bits_per_dim"] == pytest.approx(float(bits_per_dim(log_density, 4).mean()), abs=1e-5)
    assert metrics["nll"] == pytest.approx(metrics["bits_per_dim"] * 4 * math.log(2), rel=1e-6)
    assert JOB.likelihoods == {"bits_per_dim": "bits/dim", "nll": "nats"}


# -- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["glow", "realnvp"])
def test_sampling_temperature_seeds_and_range(architecture):
    model = small_flow(architecture)
    modules, config = {"flow": model}, FlowConfig(architecture=architecture)

    def draw(seed, temperature, n=6):
        return sample(modules, config, SampleRequest(n, torch.Generator().manual_seed(seed), FlowSampler(temperature)))

    images = draw(0, 1.0)
    assert images.shape == (6, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, quantize(images))  # on the 8-bit grid
    assert torch.equal(draw(0, 1.0), images) and not torch.equal(draw(1, 1.0), images)
    # temperature 0: the mode path, the prior means all the way down, whatever the seed
    mode = draw(0, 0.0)
    assert torch.equal(draw(5, 0.0), mode)
    assert torch.equal(mode[0], mode[1])
    top_mean, _ = model._top(torch.zeros(1, 1))
    x = top_mean
    for level in reversed(model.levels):
        if level.split is not None:
            mean, _ = level.split._mean_log_std(x, level.split.factored)
            x = torch.cat([x, mean], 1)
        for layer in reversed(level.layers):
            x = layer.inverse(x)
    torch.testing.assert_close(model.sample(1, 0.0, torch.Generator()), model._from_flow(x), rtol=0, atol=1e-6)


def test_reconstructions_are_exact():
    model = small_flow("glow")
    x = torch.randint(0, 256, (8, 1, 8, 8)).float() / 255
    grid = reconstructions(model, x)
    assert grid.shape == (16, 1, 8, 8)
    assert torch.equal(grid[0::2], x) and torch.equal(grid[1::2], x)
    grids = visuals({"flow": model}, FlowConfig(), {"image": x}, torch.Generator().manual_seed(0))
    assert set(grids) == {"reconstructions", "temperatures"} and grids["temperatures"].shape == (64, 1, 8, 8)


# -- it learns ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_index("builtin:digits")


@pytest.mark.parametrize("architecture", ["glow", "realnvp"])
def test_learns_digits_through_the_engine(digits, architecture):
    """Held-out bits/dim of the 8-bit digits, from the family's own train_step through the
    engine: from above 8 (the untrained flow) to well below a uniform's 8."""
    spec = from_dict({"job": {"type": "flow"}, "train": {"steps": 80, "optimizer": {"name": "adam", "lr": 3e-3},
                                                         "schedule": {"name": "constant"}}})
    config = FlowConfig(architecture=architecture, levels=2, steps_per_level=2, hidden=16, blocks=1,
                        preprocess="logit")
    engine = Engine(spec, config, data_info=DataInfo(tuple(digits.shape)), print_fn=None)
    held_out = next(iter(eval_batches(digits, "test", 256, 0, 1)))

    def held_out_bpd():
        with engine.strategy.evaluation() as modules:
            return evaluate(modules, config, held_out, torch.Generator().manual_seed(0))["bits_per_dim"]

    start = held_out_bpd()
    batches = train_batches(digits, "train", 32, rank=0, world_size=1, seed=0)
    for _ in range(80):
        metrics = engine.optimizer_step(batches)
    end = held_out_bpd()
    print(f"{architecture}: held-out bits/dim {start:.3f} -> {end:.3f}")
    assert math.isfinite(metrics["loss"])
    assert end < 7.0 and end < start - 1.5
    scores = score({"flow": engine.strategy.unwrap("flow").eval()}, config, held_out)["bits_per_dim"]
    assert scores.shape == (len(held_out["image"]),) and float(scores.mean()) == pytest.approx(end, abs=0.1)


def test_learns_binarized_digits_below_one_bit_per_dim(digits):
    """num_bits=1 through the engine: the digits' top bit (8-bit values >= 128), held-out
    bits/dim from about 1 or more (untrained) to well below a uniform's 1 bit."""
    spec = from_dict({"job": {"type": "flow"}, "train": {"steps": 40, "optimizer": {"name": "adam", "lr": 3e-3},
                                                         "schedule": {"name": "constant"}}})
    config = FlowConfig(architecture="realnvp", levels=2, hidden=16, blocks=1, num_bits=1)
    engine = Engine(spec, config, data_info=DataInfo(tuple(digits.shape)), print_fn=None)
    held_out = next(iter(eval_batches(digits, "test", 256, 0, 1)))

    def held_out_metrics():
        with engine.strategy.evaluation() as modules:
            return evaluate(modules, config, held_out, torch.Generator().manual_seed(0))

    start = held_out_metrics()["bits_per_dim"]
    batches = train_batches(digits, "train", 32, rank=0, world_size=1, seed=0)
    for _ in range(40):
        engine.optimizer_step(batches)
    end = held_out_metrics()
    print(f"realnvp, 1 bit: held-out bits/dim {start:.3f} -> {end['bits_per_dim']:.3f} ({end['nll']:.2f} nats)")
    assert end["bits_per_dim"] < 0.8 and end["bits_per_dim"] < start - 0.2
    assert end["nll"] == pytest.approx(end["bits_per_dim"] * 64 * math.log(2), rel=1e-6)


def test_resume_keeps_actnorm_statistics(digits, tmp_path):
    """A checkpoint holds the initialised statistics; the restored engine's next step does
    not initialise again."""
    spec = from_dict({"job": {"type": "flow", "config": {"levels": 2, "steps_per_level": 1, "hidden": 8}},
                      "train": {"steps": 4}, "storage_path": str(tmp_path)})
    info = DataInfo(tuple(digits.shape))
    engine = Engine(spec, data_info=info, print_fn=None)
    batches = train_batches(digits, "train", 16, rank=0, world_size=1, seed=0)
    engine.optimizer_step(batches)
    engine.save(tmp_path / "step")
    saved = {k: v.clone() for k, v in engine.strategy.unwrap("flow").state_dict().items() if k.endswith("init_bias")}
    restored = Engine(spec, data_info=info, print_fn=None)
    restored.restore(tmp_path / "step")
    restored.optimizer_step(train_batches(digits, "train", 16, rank=0, world_size=1, seed=7))
    after = restored.strategy.unwrap("flow").state_dict()
    assert saved and all(torch.equal(after[k], v) for k, v in saved.items())


# -- specs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,architecture", [("flow/realnvp-cifar10", "realnvp"), ("flow/glow-cifar10", "glow")])
def test_real_specs_build_their_papers_networks_for_cifar10(name, architecture):
    config = job_config(load_spec(name))
    assert config.architecture == architecture
    model = build(config, DataInfo((3, 32, 32)))["flow"]
    if architecture == "glow":  # L = 3, K = 32: 32 [ActNorm, 1x1 conv, coupling] steps + a squeeze per level
        assert [len(level.layers) for level in model.levels] == [1 + 3 * 32] * 3
        assert model.top_shape == (48, 4, 4)
    else:  # 3 checkerboard + squeeze + 3 channel couplings (each with an ActNorm), then 4 checkerboard
        assert [len(level.layers) for level in model.levels] == [13, 8]
        assert model.top_shape == (6, 16, 16)


@pytest.mark.parametrize("name,shape,levels,top_shape", [("flow/glow-imagenet32", (3, 32, 32), 3, (48, 4, 4)),
                                                         ("flow/glow-imagenet64", (3, 64, 64), 4, (96, 4, 4))])
def test_imagenet_specs_are_glows_l_levels_of_48_steps(name, shape, levels, top_shape):
    """The openai/glow README's ImageNet commands: --n_level 3 (32x32) or 4 (64x64), --depth 48,
    affine coupling, LU 1x1 convolutions, learned top prior, width 512. The structure is built
    with narrow coupling networks (the width changes no layer count or shape)."""
    config = job_config(load_spec(name))
    assert (config.architecture, config.levels, config.steps_per_level, config.hidden) == ("glow", levels, 48, 512)
    assert (config.coupling_scale, config.invconv, config.learned_prior, config.num_bits) == ("sigmoid", "lu", True, 8)
    model = build(dataclasses.replace(config, hidden=4), DataInfo(shape))["flow"]
    assert [len(level.layers) for level in model.levels] == [1 + 3 * 48] * levels
    assert model.top_shape == top_shape


def test_levels_that_do_not_fit_the_image_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="job.config.levels"):
        build(FlowConfig(architecture="glow", levels=4), DataInfo((1, 8, 8)))
