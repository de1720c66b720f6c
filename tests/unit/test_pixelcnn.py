"""The Gated PixelCNN family: causality of the whole network (autograd Jacobians), the
heads' normalisation over the 256 values, the NLL units by hand, the row-cached sampler
against the full network, sampling and inpainting, and that it learns digits through
gentrain.Engine.

    .venv/bin/python -m pytest -q tests/unit/test_pixelcnn.py
"""

import math

import pytest
import torch
from torch.func import jacfwd

from gentrain.data.index import load_index
from gentrain.data.pipeline import eval_batches, train_batches
from gentrain.engine import Engine
from gentrain.registry import DataInfo, SampleRequest
from gentrain.schema import SpecError
from gentrain.validation import from_dict, load_spec
from gentrain_jobs.pixelcnn import PixelCNNConfig, PixelCNNSampler, build, evaluate, sample, score, visuals
from gentrain_jobs.pixelcnn.likelihoods import (LEVELS, discretized_logistic_log_prob, log_prob,
                                                mixture_log_prob, mixture_parameters, softmax_logits)
from gentrain_jobs.pixelcnn.model import horizontal_conv

SMALL = dict(width=12, layers=3, kernel_size=3, first_kernel_size=3, head_width=24, mixtures=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(head: str, shape=(3, 5, 5), classes: int = 4, conditional: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = PixelCNNConfig(head=head, binarize=head == "bernoulli", class_conditional=conditional, **SMALL)
    return config, build(config, DataInfo(shape, classes))["pixelcnn"].double()


# -- causality -----------------------------------------------------------------------
def _per_position_outputs(head: str, model, labels, mixtures: int):
    """x [C, H, W] -> what the head says about each sub-pixel: [H, W, C, outputs].

    softmax: its 256 logits; bernoulli: its logit; logistic_mixture: the pixel's mixture
    logits with the sub-pixel's means (moved by the earlier channels) and log-scales."""
    def outputs(x):
        out = model(x[None], labels)
        if head == "softmax":
            return softmax_logits(out, x.shape[0]).double()[0].permute(2, 3, 1, 0)
        if head == "bernoulli":
            return out[0].permute(1, 2, 0)[..., None]
        logits, means, log_scales = mixture_parameters(out.double(), x[None], mixtures)
        channels = x.shape[0]
        shared = logits[0].permute(1, 2, 0)[:, :, None].expand(-1, -1, channels, -1)
        return torch.cat([shared, means[0].permute(2, 3, 1, 0), log_scales[0].permute(2, 3, 1, 0)], dim=-1)
    return outputs


def _dependence(head: str, model, shape, mixtures: int) -> torch.Tensor:
    """[D, D] bool: sub-pixel o's outputs depend on input i, both in raster-then-RGB order."""
    channels, height, width = shape
    torch.manual_seed(1)
    x = torch.rand(shape, dtype=torch.float64) * 2 - 1
    jacobian = jacfwd(_per_position_outputs(head, model, torch.tensor([2]), mixtures))(x)
    # [H, W, C, out, C, H, W] -> [(H W C), (H W C)] with index (row * W + column) * C + channel
    dims = channels * height * width
    nonzero = jacobian.ne(0).any(dim=3)
    return nonzero.permute(0, 1, 2, 4, 5, 3).reshape(dims, dims)


@pytest.mark.parametrize("head, shape", [("softmax", (3, 5, 5)), ("logistic_mixture", (3, 5, 5)),
                                         ("bernoulli", (1, 5, 5))])
def test_no_output_depends_on_its_own_or_a_later_input(head, shape):
    config, model = _small(head, shape)
    depends = _dependence(head, model, shape, config.mixtures)
    later_or_same = torch.ones_like(depends).triu()  # column >= row
    assert not (depends & later_or_same).any(), torch.nonzero(depends & later_or_same)[:5]
    # ... and every sub-pixel after the first does read earlier inputs (the test can fail).
    earlier = depends & ~later_or_same
    assert earlier[1:].any(dim=1).all()
    # No blind spot: the pixel up and to the right of (2, 2) feeds it, through the vertical stack.
    channels, _, width = shape
    at, up_right = (2 * width + 2) * channels, (1 * width + 3) * channels
    assert depends[at, up_right]
    # Within a pixel: G reads R and B reads R and G (softmax: sub-pixels; mixture: its coefficients).
    if channels == 3:
        assert depends[at + 1, at] and depends[at + 2, at] and depends[at + 2, at + 1]


def test_a_type_b_mask_in_the_first_layer_breaks_causality():
    config, model = _small("softmax")
    first = model.layers[0].horizontal
    wrong = horizontal_conv(first.in_channels, first.out_channels, 3, model.groups, "B").mask
    with torch.no_grad():
        first.mask.copy_(wrong)
    depends = _dependence("softmax", model, (3, 5, 5), config.mixtures)
    assert depends.diagonal().any()  # sub-pixels now see themselves


def test_the_row_cached_stacks_equal_the_full_network():
    for head in ("softmax", "logistic_mixture"):
        _, model = _small(head, seed=3)
        x = torch.rand(2, 3, 5, 5, dtype=torch.float64) * 2 - 1
        labels = torch.tensor([0, 3])
        full = model(x, labels)
        conds = model.conditions(labels)
        for row in range(5):
            contexts = model.row_context(x[:, :, :row], conds)
            torch.testing.assert_close(model.horizontal_row(x[:, :, row:row + 1], contexts, conds),
                                       full[:, :, row:row + 1], rtol=1e-12, atol=1e-12)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = _small("softmax", seed=10)
    x, labels = torch.rand(2, 3, 5, 5, dtype=torch.float64) * 2 - 1, torch.tensor([1, 2])
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.enable_grad_checkpointing(enabled)
        model(x, labels).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=1e-12)


# -- the heads sum to one ------------------------------------------------------------
def test_softmax_head_sums_to_one_over_256_values():
    torch.manual_seed(4)
    logits = torch.randn(LEVELS) * 10
    logits[0], logits[-1] = 40.0, -40.0  # edge values, one dominant
    levels = torch.arange(LEVELS).view(LEVELS, 1, 1, 1)
    total = log_prob("softmax", logits.expand(LEVELS, -1)[..., None, None], levels, 1).exp().sum()
    assert abs(float(total) - 1) < 1e-5


def _mixture_output(mixtures: int, channels: int, means, log_scales, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    coefficients = torch.randn(mixtures, channels * (channels - 1) // 2) * 2
    rest = torch.cat([means, log_scales, coefficients], dim=1)  # [K, 2C + C(C-1)/2]
    return torch.cat([torch.randn(mixtures), rest.flatten()]).double()


@pytest.mark.parametrize("means, log_scale", [([-0.3, 0.5, 1.4], -7.0), ([-1.2, 0.0, 0.99], -3.0),
                                              ([0.2, -0.9, 2.0], 0.5), ([0.0, 1.0, -1.0], 3.0)])
def test_logistic_mixture_sums_to_one_over_256_values_edges_included(means, log_scale):
    """Grey: the 256 values of one pixel. log_scale -7 puts almost all mass in one bin,
    means outside [-1, 1] pile it into the edge bins, 3 spreads it over all of them."""
    means = torch.tensor(means)[:, None]
    output = _mixture_output(3, 1, means, torch.full_like(means, log_scale), seed=5)
    levels = torch.arange(LEVELS).view(LEVELS, 1, 1, 1)
    total = mixture_log_prob(output.expand(LEVELS, -1)[..., None, None], levels, 3).exp().sum()
    assert abs(float(total) - 1) < 1e-5


def _bin_mass(levels: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Each value's bin mass, sigmoid(upper) - sigmoid(lower) in float64, edge bins open."""
    x = levels.double() * 2 / 255 - 1
    scale = log_scale.double().exp()
    upper = torch.where(levels == LEVELS - 1, torch.ones_like(x), torch.sigmoid((x + 1 / 255 - mean) / scale))
    lower = torch.where(levels == 0, torch.zeros_like(x), torch.sigmoid((x - 1 / 255 - mean) / scale))
    return upper - lower


def test_rgb_logistic_mixture_sums_to_one_through_the_colour_coefficients():
    """The joint over (R, G, B): for R values (the edges among them), the sum over all
    256 x 256 (G, B) equals R's marginal sum_k pi_k P_k(R), computed on its own; the
    marginals sum to one over the 256 values of R."""
    means = torch.tensor([[0.1, -0.5, 0.9], [-1.1, 0.3, 0.0]])
    log_scales = torch.tensor([[-2.0, -4.0, -1.0], [-6.0, 0.0, -3.0]])
    output = _mixture_output(2, 3, means, log_scales, seed=6)
    weights = torch.softmax(output[:2], dim=0)
    values = torch.arange(LEVELS)
    marginal = sum(weights[k] * _bin_mass(values, means[k, 0].double(), log_scales[k, 0]) for k in range(2))
    assert abs(float(marginal.sum()) - 1) < 1e-12
    for red in (0, 1, 3, 40, 128, 254, 255):
        green, blue = torch.meshgrid(values, values, indexing="ij")
        levels = torch.stack([torch.full_like(green, red), green, blue]).view(1, 3, LEVELS, LEVELS)
        joint = mixture_log_prob(output.view(1, -1, 1, 1).expand(1, -1, LEVELS, LEVELS), levels, 2).exp().sum()
        assert float(joint) == pytest.approx(float(marginal[red]), rel=1e-6, abs=1e-12), red


def test_discretized_logistic_bins_are_the_difference_of_cdfs():
    """Independent float64 computation of each bin's mass: sigmoid(upper) - sigmoid(lower)."""
    torch.manual_seed(7)
    levels = torch.randint(0, LEVELS, (2000,))
    levels[:2] = torch.tensor([0, LEVELS - 1])
    mean = torch.rand(2000, dtype=torch.float64) * 2.4 - 1.2
    log_scale = torch.rand(2000, dtype=torch.float64) * 6 - 6.0
    mass = _bin_mass(levels, mean, log_scale)
    ours = discretized_logistic_log_prob(levels, mean, log_scale).exp()
    assert (mass > 1e-3).sum() > 50 and (mass < 1e-8).sum() > 50  # both regimes present
    torch.testing.assert_close(ours, mass, rtol=1e-9, atol=1e-15)


# -- units --------------------------------------------------------------------------
def _constant_output(model, bias: torch.Tensor) -> None:
    """The last 1x1 of the head outputs `bias` everywhere: known probabilities."""
    last = model.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)


def test_softmax_nll_in_nats_and_bits_per_dim_by_hand():
    config = PixelCNNConfig(**SMALL)
    model = build(config, DataInfo((3, 2, 2)))["pixelcnn"]
    torch.manual_seed(8)
    bias = torch.randn(LEVELS * 3)
    _constant_output(model, bias)
    levels = torch.randint(0, LEVELS, (2, 3, 2, 2))
    images = levels.float() / 255
    expected = []
    for image in levels:
        nats = 0.0
        for c in range(3):  # output channel k * 3 + c is value k of channel c
            values = [float(bias[k * 3 + c]) for k in range(LEVELS)]
            normaliser = math.log(sum(math.exp(v) for v in values))
            nats -= sum(values[int(k)] - normaliser for k in image[c].flatten())
        expected.append(nats)
    metrics = evaluate({"pixelcnn": model}, config, {"image": images, "label": torch.zeros(2)}, None)
    mean = sum(expected) / 2
    assert metrics["nll"] == pytest.approx(mean, rel=1e-5)
    scores = score({"pixelcnn": model}, config, {"image": images})["nll"]  # `gentrain score`: per image
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert metrics["bits_per_dim"] == pytest.approx(mean / (12 * math.log(2)), rel=1e-5)
    _constant_output(model, torch.zeros(LEVELS * 3))  # uniform over 256 values: 8 bits/dim
    uniform = evaluate({"pixelcnn": model}, config, {"image": images, "label": torch.zeros(2)}, None)
    assert uniform["bits_per_dim"] == pytest.approx(8.0, abs=1e-5)
    assert uniform["nll"] == pytest.approx(12 * math.log(256), rel=1e-6)


def test_bernoulli_nll_in_nats_by_hand():
    config = PixelCNNConfig(head="bernoulli", binarize=True, **SMALL)
    model = build(config, DataInfo((1, 3, 3)))["pixelcnn"]
    _constant_output(model, torch.tensor([0.7]))
    images = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.51, 0.49], [1.0, 0.0, 0.3]]).view(1, 1, 3, 3)
    ones = 4  # pixels above one half
    expected = -(ones * math.log(1 / (1 + math.exp(-0.7))) + (9 - ones) * math.log(1 / (1 + math.exp(0.7))))
    metrics = evaluate({"pixelcnn": model}, config, {"image": images}, None)
    assert metrics["nll"] == pytest.approx(expected, rel=1e-6)
    assert metrics["bits_per_dim"] == pytest.approx(expected / (9 * math.log(2)), rel=1e-6)
    _constant_output(model, torch.zeros(1))
    assert evaluate({"pixelcnn": model}, config, {"image": images}, None)["nll"] == pytest.approx(9 * math.log(2))


# -- sampling ------------------------------------------------------------------------
def _draw(config, model, n, seed, labels=None, temperature=1.0):
    request = SampleRequest(n, torch.Generator().manual_seed(seed), PixelCNNSampler(temperature, chunk=4), labels)
    return sample({"pixelcnn": model.float()}, config, request)


@pytest.mark.parametrize("head, shape", [("softmax", (3, 4, 4)), ("logistic_mixture", (3, 4, 4)),
                                         ("bernoulli", (1, 4, 4))])
def test_samples_have_the_data_shape_and_grid_and_a_seed_fixes_them(head, shape):
    config, model = _small(head, shape, conditional=False)
    images = _draw(config, model, 6, seed=0)  # two chunks of 4
    levels = 1 if head == "bernoulli" else 255
    assert images.shape == (6, *shape) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images * levels, (images * levels).round())
    assert torch.equal(_draw(config, model, 6, seed=0), images)
    assert not torch.equal(_draw(config, model, 6, seed=1), images)


def test_class_conditional_samples_follow_each_samples_label():
    config, model = _small("softmax", (1, 4, 4), classes=3, seed=9)
    with torch.no_grad():  # classes far apart and sharp logits: a label moves the samples, not just the noise
        model.float()
        for layer in model.layers:
            layer.embedding.weight.mul_(20)
        model.head[-1].weight.mul_(50)
    mixed = torch.tensor([0, 1, 2, 0])
    by_label = {k: _draw(config, model, 4, seed=2, labels=torch.full((4,), k)) for k in range(3)}
    assert not torch.equal(by_label[0], by_label[1])
    # Sample i draws from its own label (the noise of sample i is the same in every call).
    drawn = _draw(config, model, 4, seed=2, labels=mixed)
    for i, k in enumerate(mixed.tolist()):
        assert torch.equal(drawn[i], by_label[k][i])
    unconditional_config, unconditional = _small("softmax", (1, 4, 4), conditional=False)
    with pytest.raises(ValueError, match="class_conditional"):
        _draw(unconditional_config, unconditional, 2, seed=0, labels=torch.tensor([0, 1]))


def test_inpainting_keeps_the_top_half_and_fills_the_rest():
    config, model = _small("softmax", (3, 6, 4), conditional=False)
    model.float()
    images = torch.randint(0, 256, (5, 3, 6, 4)).float() / 255
    grid = visuals({"pixelcnn": model}, config, {"image": images, "label": torch.zeros(5)}, None)["inpainting"]
    assert grid.shape == (9, 3, 6, 4)
    originals, masked, completed = grid[0:9:3], grid[1:9:3], grid[2:9:3]
    torch.testing.assert_close(originals, images[:3])
    assert (masked[:, :, 3:] == 0.5).all() and torch.equal(masked[:, :, :3], originals[:, :, :3])
    assert torch.equal(completed[:, :, :3], originals[:, :, :3])
    assert not torch.equal(completed[:, :, 3:], originals[:, :, 3:])


# -- configuration ---------------------------------------------------------------------
def test_configuration_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="need head: bernoulli"):
        PixelCNNConfig(binarize=True)
    with pytest.raises(ValueError, match="kernel_size: 4 must be odd"):
        PixelCNNConfig(kernel_size=4)
    with pytest.raises(ValueError, match="width: 64 is not a multiple of the 3 image channels.*use 66"):
        build(PixelCNNConfig(), DataInfo((3, 8, 8)))
    with pytest.raises(ValueError, match="class_conditional is true but the data set has no labels"):
        build(PixelCNNConfig(class_conditional=True), DataInfo((1, 8, 8), 0))
    with pytest.raises(SpecError, match="job.config.binarize"):
        load_spec("pixelcnn/debug", ["job.config.binarize=true"])


@pytest.mark.parametrize("name, shape, head, unit", [
    ("pixelcnn/mnist", (1, 28, 28), "bernoulli", "nats"), ("pixelcnn/cifar10", (3, 32, 32), "softmax", "bits/dim"),
    ("pixelcnn/imagenet32", (3, 32, 32), "softmax", "bits/dim"),
    ("pixelcnn/imagenet64", (3, 64, 64), "softmax", "bits/dim")])
def test_real_specs_validate_and_build(name, shape, head, unit):
    from gentrain.registry import get_job_type, job_config

    config = job_config(load_spec(name))
    assert config.head == head
    model = build(config, DataInfo(shape, 10))["pixelcnn"]
    assert model.shape == shape and len(model.layers) == config.layers
    assert unit in get_job_type("pixelcnn").likelihoods.values()


# -- it learns --------------------------------------------------------------------------
LEARN_STEPS = 120


@pytest.fixture(scope="module")
def digits():
    return load_index("builtin:digits")


def _train(digits, config: PixelCNNConfig) -> tuple[torch.nn.Module, float]:
    """LEARN_STEPS steps of the family's train_step through the engine (one process),
    then the held-out NLL per sample over the whole test split."""
    spec = from_dict({"job": {"type": "pixelcnn"}, "train": {
        "steps": LEARN_STEPS, "optimizer": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "constant"}}})
    engine = Engine(spec, config, data_info=DataInfo(tuple(digits.shape), digits.num_classes), print_fn=None)
    batches = train_batches(digits, "train", 32, rank=0, world_size=1, seed=0)
    for _ in range(LEARN_STEPS):
        engine.optimizer_step(batches)
    model = engine.strategy.unwrap("pixelcnn").eval()
    totals, count = {"nll": 0.0, "bits_per_dim": 0.0}, 0
    for batch in eval_batches(digits, "test", 90, 0, 1):
        metrics = evaluate({"pixelcnn": model}, config, batch, None)
        for key in totals:
            totals[key] += metrics[key] * len(batch["image"])
        count += len(batch["image"])
    return model, {key: value / count for key, value in totals.items()}


def test_learns_digits_far_below_the_uniform_bits_per_dim(digits):
    config = PixelCNNConfig(width=16, layers=4, kernel_size=3, first_kernel_size=5, head_width=32,
                            class_conditional=True)
    model, held_out = _train(digits, config)
    print(f"held-out {held_out['bits_per_dim']:.3f} bits/dim ({held_out['nll']:.1f} nats per digit)")
    assert held_out["bits_per_dim"] < 3.0  # uniform over 256 values: 8
    images = _draw(config, model, 4, seed=0, labels=torch.tensor([0, 1, 2, 3]))
    # The digits use 17 of the 256 grey levels; a model that learned puts its samples there.
    sixteenths = images * 16
    on_the_digits_grid = (sixteenths - sixteenths.round()).abs() < 0.05  # about 10% of random values
    assert on_the_digits_grid.float().mean() > 0.9


def test_learns_binarized_digits_far_below_d_ln_2_nats(digits):
    config = PixelCNNConfig(head="bernoulli", binarize=True, width=16, layers=4, kernel_size=3,
                            first_kernel_size=5, head_width=32)
    _, held_out = _train(digits, config)
    uniform = 64 * math.log(2)  # 44.4 nats per 8x8 image
    print(f"held-out {held_out['nll']:.2f} nats per binarized digit (uniform {uniform:.1f})")
    assert held_out["nll"] < 0.5 * uniform
