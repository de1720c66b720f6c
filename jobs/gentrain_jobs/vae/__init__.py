"""Variational autoencoder job type.

    gentrain run vae/debug
    gentrain run vae/debug train.steps=200 scaling.num_workers=1 job.config.beta=4
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, Supports
from gentrain.schema import bounds
from gentrain_jobs.vae.model import ConvVAE
from gentrain_jobs.vae.objective import elbo_terms, to_image


@dataclass
class VAEConfig:
    latent_dim: int = field(default=16, metadata=bounds(ge=1))
    channels: list[int] = field(default_factory=lambda: [32, 64])
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    beta: float = field(default=1.0, metadata=bounds(ge=0, help="1 is the plain ELBO"))

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be a non-empty list of positive widths")


def build(config: VAEConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    return {"vae": ConvVAE(data.shape, config.latent_dim, config.channels, config.likelihood)}


def train_step(ctx, batch) -> dict[str, float]:
    with ctx.autocast():
        terms = elbo_terms(ctx.module("vae"), batch["image"], ctx.config.likelihood,
                           beta=ctx.config.beta)
    loss = terms["loss"].mean()
    ctx.backward(loss, "vae")
    stepped = ctx.step("vae")
    metrics = {name: float(value.detach().mean()) for name, value in terms.items()}
    metrics.update(stepped)
    return metrics


@torch.no_grad()
def evaluate(modules, batch) -> dict[str, float]:
    """The true ELBO (beta = 1) on held-out data, per sample in nats."""
    x = batch["image"]
    model = modules["vae"]
    terms = elbo_terms(model, x, model.likelihood, beta=1.0)
    dims = x[0].numel()
    return {
        "elbo": float(terms["elbo"].mean()),
        "reconstruction": float(terms["reconstruction"].mean()),
        "kl": float(terms["kl"].mean()),
        "nelbo_bits_per_dim": float(-terms["elbo"].mean() / (dims * torch.log(torch.tensor(2.0)))),
    }


@torch.no_grad()
def sample(modules, n: int, generator: torch.Generator) -> torch.Tensor:
    model = modules["vae"]
    device = next(model.parameters()).device
    z = torch.randn(n, model.latent_dim, generator=generator).to(device)
    return to_image(model.decode(z).float(), model.likelihood)


JOB = JobType(
    name="vae",
    config=VAEConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate"), precisions=("fp32", "bf16", "fp16")),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Variational autoencoder (conv encoder/decoder, Bernoulli or Gaussian "
                "likelihood, ELBO with analytic KL, beta-VAE)",
)
