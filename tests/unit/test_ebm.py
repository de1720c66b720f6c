"""The EBM family: the replay buffer, the MALA option's temperature, and learning a 2-D mixture
through the engine (an MLP energy on vector data): lower energy on data than on uniform noise,
and short-run chains from noise that land near the modes, with Langevin, MALA and HMC."""

from __future__ import annotations

import math

import pytest
import torch

from gentrain.engine import Engine
from gentrain.registry import DataInfo, SampleRequest, job_config
from gentrain.validation import from_dict, load_spec
from gentrain_jobs.ebm import EBMConfig, EBMSampler, build, evaluate, run_chains, sample, temperature
from gentrain_jobs.ebm.model import ReplayBuffer


def test_replay_buffer_restarts_from_noise_when_empty_and_from_stored_samples_otherwise():
    buffer = ReplayBuffer(8, (2,))
    g = torch.Generator().manual_seed(0)
    assert buffer.starts(4, 0.05, "cpu", g).shape == (4, 2)  # empty: noise
    stored = torch.full((6, 2), 7.0)
    buffer.push(stored)
    assert buffer.count == 6
    starts = buffer.starts(1000, 0.05, "cpu", g)
    from_buffer = (starts == 7.0).all(1).float().mean()
    assert 0.92 < float(from_buffer) < 0.98  # 5% reinitialised from noise in [0, 1)
    buffer.push(torch.zeros(5, 2))  # the ring overwrites the oldest
    assert buffer.count == 8 and int((buffer.samples == 7.0).all(1).sum()) == 3


def test_mala_option_targets_the_langevin_temperature():
    """On E(x) = |x|^2 / 2 the Langevin step (step s, noise n) samples N(0, T), T = n^2 / (2 s):
    the MALA option must reach that variance exactly, not that of exp(-E)."""
    energy = lambda x: 0.5 * (x ** 2).sum(1)  # noqa: E731
    s, n = 0.1, 0.1
    assert temperature(s, n) == pytest.approx(0.05)
    chain = run_chains(energy, torch.zeros(4000, 1), "mala", 200, s, n, torch.Generator().manual_seed(0))
    assert float(chain.samples.var()) == pytest.approx(0.05, rel=0.08) and chain.acceptance > 0.5
    with pytest.raises(ValueError, match="noise > 0"):
        run_chains(energy, torch.zeros(2, 1), "mala", 1, s, 0.0, torch.Generator())


def test_hmc_option_targets_the_langevin_temperature_and_one_leapfrog_step_is_mala():
    """HMC on E / T with leapfrog step `noise`: N(0, T) on the quadratic energy; with one
    leapfrog step its proposal and test are MALA's at step noise^2 / 2, draw for draw."""
    energy = lambda x: 0.5 * (x ** 2).sum(1)  # noqa: E731
    s, n = 0.1, 0.1
    chain = run_chains(energy, torch.zeros(4000, 1), "hmc", 100, s, n, torch.Generator().manual_seed(0),
                       leapfrog_steps=5)
    assert float(chain.samples.var()) == pytest.approx(temperature(s, n), rel=0.08) and chain.acceptance > 0.5
    x0 = torch.randn(500, 3, generator=torch.Generator().manual_seed(1))
    one = run_chains(energy, x0, "hmc", 20, s, n, torch.Generator().manual_seed(2), leapfrog_steps=1)
    mala = run_chains(energy, x0, "mala", 20, s, n, torch.Generator().manual_seed(2))
    assert torch.allclose(one.samples, mala.samples, atol=1e-4)
    with pytest.raises(ValueError, match="sampler hmc needs noise > 0"):
        run_chains(energy, torch.zeros(2, 1), "hmc", 1, s, 0.0, torch.Generator())


def test_debug_spec_loads_and_conv_energy_samples_images():
    config = job_config(load_spec("ebm/debug"))
    assert isinstance(config, EBMConfig) and config.arch == "conv" and config.reinit == 0.05
    modules = build(config, DataInfo((1, 8, 8)))
    with torch.no_grad():  # as the platform's evaluation calls it: the chains take their own gradients
        images = sample(modules, config, SampleRequest(3, torch.Generator().manual_seed(0), EBMSampler(steps=2)))
        mala_images = sample(modules, config, SampleRequest(3, torch.Generator().manual_seed(0),
                                                            EBMSampler(sampler="mala", steps=2)))
        hmc_images = sample(modules, config, SampleRequest(3, torch.Generator().manual_seed(0),
                                                           EBMSampler(sampler="hmc", steps=2, leapfrog_steps=2)))
    assert mala_images.shape == (3, 1, 8, 8) and not torch.equal(mala_images, images)
    assert hmc_images.shape == (3, 1, 8, 8) and not torch.equal(hmc_images, mala_images)
    assert all(p.grad is None for p in modules["energy"].parameters())  # sampling leaves the weights alone
    assert images.shape == (3, 1, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1


RADIUS, STD = 0.35, 0.03  # four Gaussians on a circle around the centre of [0, 1]^2
CENTRES = torch.stack([torch.tensor([math.cos(a), math.sin(a)]) * RADIUS
                       for a in torch.arange(4) * (2 * math.pi / 4)]) + 0.5


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    return CENTRES[torch.randint(0, 4, (n,), generator=generator)] + STD * torch.randn(n, 2, generator=generator)


def test_learns_a_2d_mixture_through_the_engine(one_thread):
    spec = from_dict({"job": {"type": "ebm"}, "train": {"steps": 500, "batch_size": 128, "schedule": {"name": "constant"},
                                                         "optimizer": {"name": "adam", "lr": 3e-3, "betas": [0.0, 0.999]}}})
    config = EBMConfig(arch="mlp", hidden=64, steps=20, step_size=0.1, noise=0.005, buffer_size=2000, alpha=0.1)
    engine = Engine(spec, config, data_info=DataInfo((2,), kind="vector"), print_fn=None)
    data = torch.Generator().manual_seed(0)
    batches = iter(lambda: {"x": mixture(128, data)}, None)
    for _ in range(500):
        metrics = engine.optimizer_step(batches)
    assert math.isfinite(metrics["loss"])
    with engine.strategy.evaluation() as modules:
        scores = evaluate(modules, config, {"x": mixture(500, data)}, torch.Generator().manual_seed(1))
        near = {}
        for sampler in ("langevin", "mala", "hmc"):
            x = sample(modules, config, SampleRequest(500, torch.Generator().manual_seed(2),
                                                      EBMSampler(sampler=sampler, steps=200)))
            near[sampler] = float((torch.cdist(x, CENTRES).min(1).values < 4 * STD).float().mean())
    # Uniform points land within 4 std of a mode 18% of the time (4 pi 0.12^2).
    print(f"energy data {scores['energy_data']:.4f} noise {scores['energy_noise']:.4f}; near a mode {near}")
    assert scores["energy_data"] < scores["energy_noise"]
    assert near["langevin"] > 0.5 and near["mala"] > 0.5 and near["hmc"] > 0.5


def test_resume_restores_the_weights_and_starts_an_empty_replay_buffer(tmp_path):
    """The buffer is per rank and not checkpointed (documented in the family's docstring)."""
    spec = from_dict({"job": {"type": "ebm", "config": {"arch": "mlp", "hidden": 8, "steps": 2, "step_size": 0.1}},
                      "train": {"steps": 4}, "storage_path": str(tmp_path)})
    info = DataInfo((2,), kind="vector")
    engine = Engine(spec, data_info=info, print_fn=None)
    data = torch.Generator().manual_seed(0)
    batches = iter(lambda: {"x": mixture(16, data)}, None)
    engine.optimizer_step(batches)
    assert engine.strategy.unwrap("energy").replay_buffer.count == 16
    engine.save(tmp_path / "step")
    restored = Engine(spec, data_info=info, print_fn=None)
    restored.restore(tmp_path / "step")
    network = restored.strategy.unwrap("energy")
    assert getattr(network, "replay_buffer", None) is None
    saved = engine.strategy.unwrap("energy").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in network.state_dict().items())
    restored.optimizer_step(batches)
    assert network.replay_buffer.count == 16
