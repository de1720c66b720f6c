"""The GAN job type's own train_step at world size 2 (gloo): the gradient penalty taken
through the plain critic and the frozen critic in the generator step still leave every
rank with the same weights, under DDP and Accelerate; under DeepSpeed ZeRO 0-3 the
hinge + spectral-norm DCGAN and ZeRO 0-2 the WGAN-GP follow DDP's losses and weights.
"""

import pytest
import torch

from common import make_spec
from harness import run_world

WORLD = 2


def run_gan_job(rank: int, world: int, strategy_section: dict, steps: int, config_overrides: dict | None = None):
    from gentrain.context import StepContext
    from gentrain.registry import DataInfo
    from gentrain.strategies import make_strategy
    from gentrain.strategies.base import make_optimizer
    from gentrain_jobs.gan import JOB, GANConfig, build, optimizers

    spec = make_spec(strategy_section, grad_clip=None)
    settings = {"arch": "mlp", "latent_dim": 4, "hidden": 16, "depth": 2, "loss": "wgan-gp", "d_norm": "none",
                "n_critic": 2, "ema_decay": 0.9, **(config_overrides or {})}
    config = GANConfig(**settings)
    shape = (2,) if config.arch == "mlp" else (1, 8, 8)
    torch.manual_seed(0)  # identical initial weights on every rank
    modules = build(config, DataInfo(shape))
    strategy = make_strategy(spec, torch.device("cpu"))
    strategy.setup(modules, optimizers(config, modules, lambda params, lr=None, betas=None:
                                       make_optimizer(params, spec.train.optimizer)))
    ctx = StepContext(strategy, config, steps)
    data = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    penalties = []
    for step in range(steps):
        ctx.global_step = step
        with strategy.micro_step(is_last=True):
            metrics = JOB.train_step(ctx, {"image": torch.rand(8, *shape, generator=data)})
        penalties.append(metrics["gradient_penalty"] if config.loss == "wgan-gp" else metrics["d_loss"])
    weights = {name: torch.cat([v.flatten() for v in state.values()])
               for name, state in strategy.export_state_dicts().items()}
    return weights, penalties


REPLICA_SECTIONS = {"ddp": {"name": "ddp"}, "accelerate": {"name": "accelerate"}}
DCGAN = {"arch": "dcgan", "latent_dim": 8, "channels": [8, 16], "loss": "hinge", "d_norm": "spectral",
         "n_critic": 1}
ZERO_CASES = {"hinge-spectral-dcgan": (DCGAN, (0, 1, 2, 3)), "wgan-gp-mlp": ({}, (1, 2))}


def run_every_case(rank: int, world: int) -> dict:
    """One world for every case (spawning one is the slow part): the WGAN-GP step under
    DDP and Accelerate, then per ZERO_CASES entry DDP and DeepSpeed at each ZeRO stage on
    the same data, as (weights, per-step values)."""
    results = {("replicas", label): run_gan_job(rank, world, section, 4)
               for label, section in REPLICA_SECTIONS.items()}
    for case, (config_overrides, stages) in ZERO_CASES.items():
        results[case, "ddp"] = run_gan_job(rank, world, {"name": "ddp"}, 3, config_overrides)
        for stage in stages:
            results[case, stage] = run_gan_job(rank, world, {"name": "deepspeed", "zero_stage": stage}, 3,
                                               config_overrides)
    return results


@pytest.fixture(scope="module")
def every_case():  # [rank 0's results, rank 1's]
    return run_world(run_every_case, WORLD, timeout=600)


@pytest.mark.parametrize("label", sorted(REPLICA_SECTIONS))
def test_wgan_gp_step_keeps_replicas_identical(every_case, label):
    (first, penalties), (second, _) = (rank_results["replicas", label] for rank_results in every_case)
    assert all(p > 0 for p in penalties)
    for name in ("generator", "discriminator"):
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_deepspeed_zero_trains_the_gan_like_ddp(every_case, case):
    """The generator learns through the frozen critic's plain network (ctx.frozen), so no
    ZeRO gradient hook of the critic's engine runs inside the generator's backward."""
    _, stages = ZERO_CASES[case]
    for results in every_case:
        reference_weights, reference_values = results[case, "ddp"]
        for stage in stages:
            weights, values = results[case, stage]
            torch.testing.assert_close(torch.tensor(values), torch.tensor(reference_values), rtol=1e-5, atol=0,
                                       msg=f"ZeRO {stage}: per-step losses")
            for name in ("generator", "discriminator"):
                torch.testing.assert_close(weights[name], reference_weights[name], rtol=1e-4, atol=1e-6,
                                           msg=f"ZeRO {stage}: {name} weights")
