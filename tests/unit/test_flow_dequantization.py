"""Variational dequantization of the flow job type (job.config.dequantization=variational):
q's log-density against its autograd Jacobian, u inside the unit cube and y inside x's cube,
an untrained q is the uniform dequantization, and a learned q gives a tighter bound than
uniform noise on binarized digits."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from gentrain.data.index import load_index
from gentrain.data.pipeline import eval_batches, train_batches
from gentrain.engine import Engine
from gentrain.registry import DataInfo, SampleRequest, job_config
from gentrain.validation import from_dict, load_spec
from gentrain_jobs.flow import FlowConfig, FlowSampler, build, evaluate, reconstructions, sample, score
from gentrain_jobs.flow.dequantizer import MARGIN, VariationalDequantizer, logistic_log_prob, logistic_noise
from gentrain_jobs.flow.model import Flow
from gentrain_jobs.flow.objective import bits_per_dim, dequantize, levels, quantize
from test_flow import perturb  # every parameter off its initial value (q's couplings start as the identity)


def images(shape, num_levels: int = 256, seed: int = 0) -> torch.Tensor:
    """Images at `num_levels` levels, as the data pipeline gives them (8-bit j / 255)."""
    k = torch.randint(0, num_levels, shape, generator=torch.Generator().manual_seed(seed))
    return torch.round(k * (255 / (num_levels - 1))) / 255


@pytest.mark.parametrize("shape,seed", [((1, 4, 4), 0), ((2, 2, 4), 1)])
def test_log_q_is_the_logistic_density_over_the_autograd_jacobian(shape, seed):
    """log q(u | x) = log Logistic(eps) - log|det du/deps|, the Jacobian of eps -> u (couplings
    and the squashing sigmoid) from autograd, for random conditional weights."""
    torch.manual_seed(seed)
    dequantizer = perturb(VariationalDequantizer(shape, 256, hidden=6, steps=3), 0.3, seed).double()
    x = images((1, *shape), seed=seed).double()
    eps = logistic_noise((1, *shape), torch.Generator().manual_seed(seed)).double()
    u, log_q = dequantizer(x, eps)
    matrix = jacobian(lambda e: dequantizer(x, e.view(1, *shape))[0].flatten(), eps.flatten())
    sign, logdet = torch.linalg.slogdet(matrix)
    assert sign != 0
    assert not torch.allclose(u, MARGIN + (1 - 2 * MARGIN) * torch.sigmoid(eps))  # the couplings act
    torch.testing.assert_close(log_q, logistic_log_prob(eps) - logdet.reshape(1), rtol=1e-10, atol=1e-10)
    # and q depends on the image: another image, another u from the same noise
    assert not torch.allclose(dequantizer(images((1, *shape), seed=seed + 7).double(), eps)[0], u)


@pytest.mark.parametrize("num_levels", [2, 8, 256])
def test_u_is_inside_the_unit_cube_and_y_inside_the_cube_of_x(num_levels):
    """Float32, noise up to +-1e4 (far past where a sigmoid rounds to 0 or 1) and the top
    level: u stays in [m, 1 - m] inside (0, 1), and y = dequantize(x, u) lies in the cube of x's
    level (quantize(y) is x at 2 and 256 levels)."""
    shape = (2, 8, 8)
    dequantizer = perturb(VariationalDequantizer(shape, num_levels, hidden=8, steps=2), 1.0)
    x = images((64, *shape), num_levels, seed=2)
    x[0] = 1.0  # the top level k = L - 1, where y is nearest 1
    eps = logistic_noise(x.shape, torch.Generator().manual_seed(3)) * 10.0
    eps[1], eps[2] = 1e4, -1e4
    with torch.no_grad():
        u, log_q = dequantizer(x, eps)
    assert float(u.min()) >= MARGIN > 0 and float(u.max()) <= 1 - MARGIN < 1
    assert bool(torch.isfinite(log_q).all())
    y = dequantize(x, u, num_levels)
    assert torch.equal(torch.floor(y * num_levels), levels(x, num_levels))
    assert torch.equal(quantize(y, num_levels), levels(x, num_levels) / (num_levels - 1))  # x's level
    if num_levels in (2, 256):  # the levels are the 8-bit images themselves
        assert torch.equal(quantize(y, num_levels), x)


def test_an_untrained_q_is_the_uniform_dequantization():
    """Identity couplings at initialisation: u = m + (1 - 2m) sigmoid(eps) with eps = logit(v)
    is the uniform v shrunk onto [m, 1 - m], log q = -D log(1 - 2m) for every image, and the
    variational integrand is the uniform one at that u, less that constant."""
    torch.manual_seed(0)
    config = FlowConfig(levels=2, steps_per_level=2, hidden=8, dequantization="variational")
    model = perturb(build(config, DataInfo((1, 8, 8)))["flow"], 0.05).eval()
    dequantizer = build(config, DataInfo((1, 8, 8)))["flow"].dequantizer  # untrained
    model.dequantizer = dequantizer
    x = images((6, 1, 8, 8), seed=4)
    v = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) + 2.0 ** -25
    eps = torch.log(v) - torch.log1p(-v)
    with torch.no_grad():
        u, log_q = dequantizer(x, eps)
        bound, _ = model(image=x, noise=eps)
        uniform, _ = model(dequantize(x, u))
    torch.testing.assert_close(u, MARGIN + (1 - 2 * MARGIN) * v, rtol=0, atol=1e-6)
    torch.testing.assert_close(log_q, torch.full((6,), -64 * math.log(1 - 2 * MARGIN)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bound, uniform - log_q, rtol=0, atol=1e-4)


def test_uniform_runs_build_no_dequantizer_and_a_flow_without_one_refuses_images():
    torch.manual_seed(0)
    model = build(FlowConfig(levels=2, steps_per_level=1, hidden=4), DataInfo((1, 4, 4)))["flow"]
    assert model.dequantizer is None
    torch.manual_seed(0)  # the variational build draws the same flow, then q
    variational = build(FlowConfig(levels=2, steps_per_level=1, hidden=4, dequantization="variational"),
                        DataInfo((1, 4, 4)))["flow"]
    flow_weights = {k: v for k, v in variational.state_dict().items() if not k.startswith("dequantizer.")}
    assert flow_weights.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in flow_weights.items())
    with pytest.raises(ValueError, match="job.config.dequantization"):
        model(image=torch.zeros(1, 1, 4, 4), noise=torch.zeros(1, 1, 4, 4))


def test_sampling_and_reconstructions_do_not_touch_q():
    """q is only in the likelihood: the same flow samples and reconstructs the same with or
    without a dequantizer (and reconstructions stay exact)."""
    torch.manual_seed(0)
    config = FlowConfig(levels=2, steps_per_level=2, hidden=8, dequantization="variational")
    model = build(config, DataInfo((1, 8, 8)))["flow"]
    model.train()
    model(image=images((16, 1, 8, 8)), noise=logistic_noise((16, 1, 8, 8), torch.Generator().manual_seed(0)))
    model = perturb(model, 0.05).eval()
    plain = Flow((1, 8, 8), "glow", 2, 2, 8)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dequantizer.")})
    plain.eval()
    request = lambda: SampleRequest(4, torch.Generator().manual_seed(1), FlowSampler(0.7))  # noqa: E731
    assert torch.equal(sample({"flow": model}, config, request()), sample({"flow": plain}, config, request()))
    x = images((8, 1, 8, 8), seed=6)
    grid = reconstructions(model, x)
    assert torch.equal(grid[0::2], x) and torch.equal(grid[1::2], x)


def test_evaluate_and_score_report_the_variational_bound():
    """eval's bits/dim is the mean of (-(log p(y) - log q(u | x)) + D log L) / (D ln 2) over
    one draw per image from the generator; score is the same with its fixed seed."""
    torch.manual_seed(0)
    config = FlowConfig(levels=2, steps_per_level=2, hidden=8, dequantization="variational")
    model = perturb(build(config, DataInfo((1, 8, 8)))["flow"], 0.05).eval()
    x = images((5, 1, 8, 8), seed=8)
    metrics = evaluate({"flow": model}, config, {"image": x}, torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = logistic_noise(x.shape, torch.Generator().manual_seed(0))
        u, log_q = model.dequantizer(x, eps)
        log_p, _ = model(dequantize(x, u))
    expected = bits_per_dim(log_p - log_q, 64)
    assert metrics["bits_per_dim"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert metrics["nll"] == pytest.approx(metrics["bits_per_dim"] * 64 * math.log(2), rel=1e-6)
    scores = score({"flow": model}, config, {"image": x})["bits_per_dim"]
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)  # score's seed is 0 too


# -- a tighter bound ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_index("builtin:digits")


def train(digits, dequantization: str, steps: int) -> tuple[Engine, FlowConfig]:
    spec = from_dict({"job": {"type": "flow"}, "train": {"steps": steps, "optimizer": {"name": "adam", "lr": 3e-3},
                                                         "schedule": {"name": "constant"}}})
    config = FlowConfig(architecture="realnvp", levels=2, hidden=16, blocks=1, num_bits=1,
                        dequantization=dequantization, dequantizer_hidden=16)
    engine = Engine(spec, config, data_info=DataInfo(tuple(digits.shape)), print_fn=None)
    batches = train_batches(digits, "train", 32, rank=0, world_size=1, seed=0)
    for _ in range(steps):
        engine.optimizer_step(batches)
    return engine, config


def held_out_bpd(modules, config, held_out) -> float:
    return evaluate(modules, config, held_out, torch.Generator().manual_seed(0))["bits_per_dim"]


def test_a_learned_q_bounds_binarized_digits_tighter_than_uniform_noise(digits):
    """Binarized digits (num_bits=1), the same RealNVP, 60 steps through the engine each:
    the held-out bound with q trained jointly beats uniform dequantization's (measured 0.59 vs
    0.68 bits/dim), and for the uniform run's own flow a q trained alone (the flow frozen)
    lowers that flow's bound (measured 0.68 -> 0.64): q starts uniform and only improves."""
    held_out = next(iter(eval_batches(digits, "test", 256, 0, 1)))
    uniform_engine, uniform_config = train(digits, "uniform", 60)
    variational_engine, variational_config = train(digits, "variational", 60)
    with uniform_engine.strategy.evaluation() as modules:
        uniform = held_out_bpd(modules, uniform_config, held_out)
    with variational_engine.strategy.evaluation() as modules:
        variational = held_out_bpd(modules, variational_config, held_out)
    print(f"binarized digits, 60 steps: held-out bits/dim uniform {uniform:.3f}, variational {variational:.3f}")
    assert variational < uniform - 0.03

    # the uniform run's flow with a q of its own, trained with the flow frozen
    torch.manual_seed(0)
    model = build(variational_config, DataInfo(tuple(digits.shape)))["flow"]
    model.load_state_dict(uniform_engine.strategy.unwrap("flow").state_dict(), strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.dequantizer.parameters():
        p.requires_grad_(True)
    model.eval()  # ActNorm is initialised; eval mode changes nothing else here
    with torch.no_grad():
        same_flow_start = held_out_bpd({"flow": model}, variational_config, held_out)
    optimizer = torch.optim.Adam(model.dequantizer.parameters(), lr=3e-3)
    batches = train_batches(digits, "train", 32, rank=0, world_size=1, seed=1)
    for _ in range(40):
        x = next(batches)["image"]
        log_bound, _ = model(image=x, noise=logistic_noise(x.shape))
        loss = bits_per_dim(log_bound, x[0].numel(), 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        same_flow = held_out_bpd({"flow": model}, variational_config, held_out)
    print(f"uniform run's flow: uniform bound {uniform:.3f}, untrained q {same_flow_start:.3f}, "
          f"trained q {same_flow:.3f}")
    assert same_flow_start == pytest.approx(uniform, abs=2e-3)  # an untrained q is uniform (one margin off)
    assert same_flow < uniform - 0.01


def test_debug_spec_validates_with_variational_dequantization():
    spec = load_spec("flow/debug", ["job.config.dequantization=variational"])
    config = job_config(spec)
    assert config.dequantization == "variational"
    assert build(config, DataInfo((1, 8, 8)))["flow"].dequantizer is not None
    assert job_config(load_spec("flow/debug")).dequantization == "uniform"
    with pytest.raises(Exception, match="dequantization"):
        job_config(load_spec("flow/debug", ["job.config.dequantization=gaussian"]))
