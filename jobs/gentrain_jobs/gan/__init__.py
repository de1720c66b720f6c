"""Generative adversarial network job type (DCGAN, WGAN-GP, SNGAN-style hinge).

    gentrain run gan/debug
    gentrain run gan/debug job.config.loss=wgan-gp job.config.n_critic=5 job.config.d_norm=none
    gentrain sample runs/gan-debug --set truncation=1.0 --out truncated.png

One train_step = n_critic critic updates, then one generator update. The step's real
batch is split into n_critic chunks, one per critic update, so every critic update sees
fresh real data as in WGAN-GP's algorithm (set train.batch_size = per-update batch x
n_critic); the generator update draws as many fakes as one chunk holds. With
train.grad_accum > 1 the critic updates accumulate with the other micro-batches' and step
at the boundary, so keep grad_accum = 1 when n_critic > 1. The critic's lr schedule steps
once per critic update: prefer the constant schedule.

Data: images (arch dcgan, batch["image"]) or vectors (arch mlp, batch["x"]), both in
[0, 1]; the networks work in tanh's [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports, batch_inputs
from gentrain.schema import bounds
from gentrain_jobs.gan.model import (DCGANDiscriminator, DCGANGenerator, MLPDiscriminator,
                                     MLPGenerator, init_dcgan_weights)
from gentrain_jobs.gan.objective import (discriminator_loss, generator_loss, gradient_penalty,
                                         interpolate)


@dataclass
class GANConfig:
    arch: Literal["dcgan", "mlp"] = "dcgan"
    latent_dim: int = field(default=100, metadata=bounds(ge=1))
    channels: list[int] = field(default_factory=lambda: [64, 128],
                                metadata={"help": "dcgan widths, image side first"})
    hidden: int = field(default=128, metadata=bounds(ge=1, help="mlp width"))
    depth: int = field(default=3, metadata=bounds(ge=1, help="mlp hidden layers"))
    loss: Literal["ns", "hinge", "wgan-gp"] = "ns"
    d_norm: Literal["batch", "spectral", "none"] = "batch"
    gp_weight: float = field(default=10.0, metadata=bounds(ge=0, help="WGAN-GP's lambda"))
    n_critic: int = field(default=1, metadata=bounds(ge=1))
    g_lr: float = field(default=2e-4, metadata=bounds(gt=0))
    d_lr: float = field(default=2e-4, metadata=bounds(gt=0))
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    ema_decay: float = field(default=0.999, metadata=bounds(ge=0, lt=1, help="0 turns EMA off"))

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"job.config.channels: {self.channels} must be a non-empty list of positive widths")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"job.config.betas: {self.betas} must be two numbers in [0, 1), e.g. [0.5, 0.999]")
        if self.loss == "wgan-gp" and self.d_norm == "batch":
            raise ValueError("job.config.d_norm: 'batch' with loss 'wgan-gp' makes the per-sample "
                             "gradient penalty depend on the batch; use d_norm=none or spectral")


@dataclass(frozen=True)
class GANSampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    truncation: float = field(default=0.0, metadata=bounds(
        ge=0, help="truncation trick: latent entries beyond +-truncation are redrawn; 0 turns it off"))


def build(config: GANConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    if config.arch == "mlp":
        if len(data.shape) != 1:
            raise ValueError(f"job.config.arch: 'mlp' needs vector data, got samples of shape "
                             f"{tuple(data.shape)}; use arch=dcgan for images")
        dim = data.shape[0]
        return {"generator": MLPGenerator(dim, config.latent_dim, config.hidden, config.depth),
                "discriminator": MLPDiscriminator(dim, config.hidden, config.depth, config.d_norm)}
    if len(data.shape) != 3:
        raise ValueError(f"job.config.arch: 'dcgan' needs images [C, H, W], got samples of shape "
                         f"{tuple(data.shape)}; use arch=mlp for vectors")
    modules = {"generator": DCGANGenerator(data.shape, config.latent_dim, config.channels),
               "discriminator": DCGANDiscriminator(data.shape, config.channels, config.d_norm)}
    for module in modules.values():
        init_dcgan_weights(module)
    return modules


def optimizers(config: GANConfig, modules, make_optimizer) -> dict[str, torch.optim.Optimizer]:
    betas = tuple(config.betas)
    return {"generator": make_optimizer(modules["generator"].parameters(), lr=config.g_lr, betas=betas),
            "discriminator": make_optimizer(modules["discriminator"].parameters(), lr=config.d_lr, betas=betas)}


def _noise(n: int, latent_dim: int, like: torch.Tensor, generator: torch.Generator | None = None):
    return torch.randn(n, latent_dim, generator=generator).to(like.device)


def truncated_noise(n: int, latent_dim: int, truncation: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) draws, entries beyond +-truncation redrawn until inside (BigGAN's trick); 0: plain."""
    z = torch.randn(n, latent_dim, generator=generator)
    if truncation > 0:
        outside = z.abs() > truncation
        while outside.any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator)
            outside = z.abs() > truncation
    return z


def _critic_update(ctx, real: torch.Tensor) -> dict[str, torch.Tensor]:
    config = ctx.config
    generator = ctx.module("generator")
    with torch.no_grad(), ctx.autocast():
        fake = generator(_noise(len(real), config.latent_dim, real)).float()
    with ctx.autocast():
        # Real and fake in one forward: one DDP/engine call per update (as BigGAN's D does).
        scores = ctx.module("discriminator")(torch.cat([real, fake])).float()
    real_scores, fake_scores = scores[:len(real)], scores[len(real):]
    loss = discriminator_loss(config.loss, real_scores, fake_scores)
    penalty = torch.zeros((), device=real.device)
    if config.loss == "wgan-gp" and config.gp_weight > 0:
        # Through the plain network: DeepSpeed engines refuse the inner autograd.grad call.
        # Its weights are the engine's, so the penalty's gradient reaches the same
        # parameters and is all-reduced with the rest in ctx.backward.
        critic = ctx.plain("discriminator")
        with ctx.autocast():
            penalty = gradient_penalty(critic, interpolate(real, fake))
        loss = loss + config.gp_weight * penalty
    ctx.backward(loss, "discriminator")
    stepped = ctx.step("discriminator")
    return {"d_loss": loss.detach(), "d_real": real_scores.detach().mean(),
            "d_fake": fake_scores.detach().mean(), "gradient_penalty": penalty.detach(), **stepped}


def _refuse_gp_under_zero(ctx) -> None:
    """The penalty runs through the plain critic, whose weights ZeRO-3 keeps partitioned
    outside a gather; say so instead of failing inside a matrix product."""
    section = ctx.strategy.section
    if section.name == "deepspeed" and section.zero_stage >= 3:
        raise ValueError(_GP_UNDER_ZERO3.format(stage=section.zero_stage))


_GP_UNDER_ZERO3 = ("job.config.loss: 'wgan-gp' does not run under strategy.name=deepspeed with "
                   "zero_stage={stage} (the gradient penalty needs the critic's full weights); use "
                   "strategy.zero_stage=2 or lower, or job.config.loss=hinge")


def validate(config: GANConfig, spec) -> list[str]:
    """Refused at `gentrain validate`, before any worker starts."""
    strategy = spec.strategy
    if (strategy.name == "deepspeed" and strategy.zero_stage >= 3 and config.loss == "wgan-gp"
            and config.gp_weight > 0):
        return [_GP_UNDER_ZERO3.format(stage=strategy.zero_stage)]
    return []


# Seen on CPU: DeepSpeed 0.19.8 casts parameters to bf16 but keeps buffers (the DCGAN
# generator's batch-norm running statistics) in fp32, and CPU batch norm refuses the mix
# ("expected scalar type BFloat16 but found Float"). Not tried on a GPU.
_DEEPSPEED_LOW_PRECISION = ("DeepSpeed keeps batch-norm buffers in fp32 beside low-precision weights; "
                            "use fp32 with deepspeed, or bf16 with strategy.name=ddp or accelerate")


def train_step(ctx, batch) -> dict[str, float]:
    config = ctx.config
    if config.loss == "wgan-gp" and config.gp_weight > 0:
        _refuse_gp_under_zero(ctx)
    real = batch_inputs(batch).float() * 2.0 - 1.0  # data in [0, 1], networks in tanh's [-1, 1]
    chunks = real.chunk(config.n_critic)
    critic_metrics = [_critic_update(ctx, chunk) for chunk in chunks]
    with ctx.frozen("discriminator") as critic:
        with ctx.autocast():
            fake = ctx.module("generator")(_noise(len(chunks[0]), config.latent_dim, real))
            g_loss = generator_loss(config.loss, critic(fake).float())
        ctx.backward(g_loss, "generator")
    stepped = ctx.step("generator")
    if config.ema_decay > 0:
        ctx.ema_update("generator", config.ema_decay)
    metrics = {key: float(torch.stack([m[key] for m in critic_metrics]).mean())
               for key in ("d_loss", "d_real", "d_fake", "gradient_penalty")}
    # The critic's step outputs (grad_norm/discriminator) of its last update.
    metrics.update({k: v for k, v in critic_metrics[-1].items() if "/" in k})
    metrics.update(stepped)
    metrics["g_loss"] = float(g_loss.detach())
    metrics["loss"] = metrics["d_loss"]  # the progress line's loss: the critic's objective
    return metrics


def _mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).float()
    n = len(flat)
    return torch.cdist(flat, flat).sum() / max(1, n * (n - 1))


@torch.no_grad()
def evaluate(modules, config: GANConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Critic scores and a mode-collapse signal on a held-out batch.

    diversity: mean pairwise distance between generated samples over the same statistic
    of the real batch. Near 1 when the samples spread like the data; a collapsed generator
    (many z to one output) drives it toward 0.
    """
    real = batch_inputs(batch).float() * 2.0 - 1.0
    fake = modules["generator"](_noise(len(real), config.latent_dim, real, generator)).float()
    real_scores = modules["discriminator"](real).float()
    fake_scores = modules["discriminator"](fake).float()
    return {
        "d_real": float(real_scores.mean()),
        "d_fake": float(fake_scores.mean()),
        "diversity": float(_mean_pairwise_distance(fake) / _mean_pairwise_distance(real).clamp_min(1e-8)),
    }


@torch.no_grad()
def sample(modules, config: GANConfig, request: SampleRequest) -> torch.Tensor:
    network = modules["generator"]
    device = next(network.parameters()).device
    z = truncated_noise(request.n, config.latent_dim, request.settings.truncation, request.generator).to(device)
    return ((network(z).float() + 1.0) / 2.0).clamp(0.0, 1.0)


JOB = JobType(
    name="gan",
    config=GANConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    optimizers=optimizers,
    validate=validate,
    sampler=GANSampler,
    data_kinds=("image", "vector"),
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate", "fsdp"), precisions=("fp32", "bf16", "fp16"),
                      excluded=(("deepspeed", "bf16", _DEEPSPEED_LOW_PRECISION),
                                ("deepspeed", "fp16", _DEEPSPEED_LOW_PRECISION),
                                ("fsdp", "fp16", "strategy.name=fsdp has no fp16 loss scaling; use bf16")),
                      sharded_build=True),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Generative adversarial network (DCGAN/MLP; non-saturating, hinge or WGAN-GP "
                "loss; spectral norm; n_critic; EMA generator)",
)
