"""The GAN job type's own train_step at world size 2 (gloo): the gradient penalty taken
through the plain critic and the frozen critic in the generator step still leave every
rank with the same weights, under DDP and Accelerate.
"""

import pytest
import torch

from common import make_spec
from harness import run_world

WORLD = 2


def run_gan_job(rank: int, world: int, strategy_section: dict, steps: int):
    from gentrain.context import StepContext
    from gentrain.registry import DataInfo
    from gentrain.strategies import make_strategy
    from gentrain.strategies.base import make_optimizer
    from gentrain_jobs.gan import JOB, GANConfig, build, optimizers

    spec = make_spec(strategy_section, grad_clip=None)
    config = GANConfig(arch="mlp", latent_dim=4, hidden=16, depth=2, loss="wgan-gp", d_norm="none",
                       n_critic=2, ema_decay=0.9)
    torch.manual_seed(0)  # identical initial weights on every rank
    modules = build(config, DataInfo((2,)))
    strategy = make_strategy(spec, torch.device("cpu"))
    strategy.setup(modules, optimizers(config, modules, lambda params, lr=None, betas=None:
                                       make_optimizer(params, spec.train.optimizer)))
    ctx = StepContext(strategy, config, steps)
    data = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    penalties = []
    for step in range(steps):
        ctx.global_step = step
        with strategy.micro_step(is_last=True):
            metrics = JOB.train_step(ctx, {"image": torch.rand(8, 2, generator=data)})
        penalties.append(metrics["gradient_penalty"])
    weights = {name: torch.cat([v.flatten() for v in state.values()])
               for name, state in strategy.export_state_dicts().items()}
    return weights, penalties


@pytest.mark.parametrize("section", [{"name": "ddp"}, {"name": "accelerate"}])
def test_wgan_gp_step_keeps_replicas_identical(section):
    (first, penalties), (second, _) = run_world(run_gan_job, WORLD, args=(section, 4))
    assert all(p > 0 for p in penalties)
    for name in ("generator", "discriminator"):
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
