"""Variational autoencoder job type.

    gentrain run vae/debug
    gentrain run vae/debug train.steps=200 scaling.num_workers=1 job.config.beta=4
    gentrain run vae/debug job.config.kl_anneal.schedule=cyclical job.config.free_bits=0.25
    gentrain score runs/vae-debug builtin:digits --split test --out scores.csv
    gentrain sample runs/vae-debug --set temperature=0.7 --out cooler.png

Files: model.py (networks), likelihoods.py (p(x|z)), objective.py (ELBO, KL weight,
free bits, IWAE), monitors.py (evaluation, visuals, anomaly scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.schema import bounds
from gentrain_jobs.vae import monitors
from gentrain_jobs.vae.model import ConvVAE
from gentrain_jobs.vae.objective import elbo_terms, kl_weight, to_image


@dataclass
class KLAnneal:
    """Warm-up of the KL weight (it multiplies beta); see objective.kl_weight."""

    schedule: Literal["none", "linear", "cyclical"] = "none"
    warmup_steps: int = field(default=0, metadata=bounds(ge=0, help="linear: steps from 0 to 1"))
    cycles: int = field(default=4, metadata=bounds(ge=1, help="cyclical: periods over the run"))
    ratio: float = field(default=0.5, metadata=bounds(gt=0, le=1,
                                                      help="cyclical: rising share of each period"))

    def __post_init__(self):
        if self.schedule == "linear" and self.warmup_steps == 0:
            raise ValueError("kl_anneal.schedule is 'linear' but warmup_steps is 0: set "
                             "warmup_steps (e.g. 10% of train.steps) or use schedule: none")


@dataclass
class VAEConfig:
    latent_dim: int = field(default=16, metadata=bounds(ge=1))
    channels: list[int] = field(default_factory=lambda: [32, 64])
    likelihood: Literal["bernoulli", "gaussian", "logistic"] = "bernoulli"
    beta: float = field(default=1.0, metadata=bounds(ge=0, help="1 is the plain ELBO"))
    kl_anneal: KLAnneal = field(default_factory=KLAnneal)
    free_bits: float = field(default=0.0, metadata=bounds(
        ge=0, help="per-latent-dimension KL floor in nats; 0 turns it off"))
    iwae_samples: int = field(default=1000, metadata=bounds(
        ge=0, help="importance samples for the IWAE bound at evaluation; 0 skips it"))
    iwae_chunk: int = field(default=100, metadata=bounds(
        ge=1, help="importance samples decoded at once; memory grows with chunk x batch"))

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be a non-empty list of positive widths")


@dataclass(frozen=True)
class VAESampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    temperature: float = field(default=1.0, metadata=bounds(
        gt=0, help="scales the prior's standard deviation: below 1 trades diversity for typical samples"))


def build(config: VAEConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    return {"vae": ConvVAE(data.shape, config.latent_dim, config.channels, config.likelihood)}


def train_step(ctx, batch) -> dict[str, float]:
    config = ctx.config
    anneal = config.kl_anneal
    weight = kl_weight(anneal.schedule, ctx.global_step, ctx.total_steps, anneal.warmup_steps,
                       anneal.cycles, anneal.ratio)
    with ctx.autocast():
        terms = elbo_terms(ctx.module("vae"), batch["image"], config.likelihood,
                           beta=config.beta * weight, free_bits=config.free_bits)
    loss = terms["loss"].mean()
    ctx.backward(loss, "vae")
    stepped = ctx.step("vae")
    # One host transfer for every term, not one each (each is a sync on a GPU).
    means = torch.stack([value.detach().mean() for value in terms.values()]).tolist()
    metrics = dict(zip(terms, means))
    metrics["kl_weight"] = weight
    metrics.update(stepped)
    return metrics


def evaluate(modules, config: VAEConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """True ELBO (beta = 1), IWAE bound over config.iwae_samples, bits/dim, active units and
    per-dimension KL."""
    return monitors.evaluation_metrics(modules["vae"], batch["image"], config.iwae_samples,
                                       config.iwae_chunk, generator)


def visuals(modules, config: VAEConfig, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    model, x = modules["vae"], batch["image"]
    grids = {"reconstructions": monitors.reconstructions(model, x),
             "traversals": monitors.latent_traversals(model, x),
             "interpolations": monitors.interpolations(model, x)}
    # Pairs need two held-out images: with eval.num_samples 1 those grids are left out.
    return {name: images for name, images in grids.items() if len(images)}


def score(modules, config: VAEConfig, batch) -> dict[str, torch.Tensor]:
    return monitors.anomaly_scores(modules["vae"], batch["image"])


@torch.no_grad()
def sample(modules, config: VAEConfig, request: SampleRequest) -> torch.Tensor:
    model = modules["vae"]
    device = next(model.parameters()).device
    z = request.settings.temperature * torch.randn(request.n, config.latent_dim, generator=request.generator)
    z = z.to(device)
    return to_image(model.decode(z).float(), model.likelihood)


JOB = JobType(
    name="vae",
    config=VAEConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    visuals=visuals,
    score=score,
    sampler=VAESampler,
    # elbo and iwae are bounds on log p(x) per sample; the bits/dim are their negatives per dimension
    likelihoods={"elbo": "nats", "iwae": "nats", "nelbo_bits_per_dim": "bits/dim",
                 "nll_bits_per_dim": "bits/dim"},
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate", "fsdp"), precisions=("fp32", "bf16", "fp16"),
                      excluded=(("fsdp", "fp16", "strategy.name=fsdp has no fp16 loss scaling; use bf16"),),
                      sharded_build=True),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Variational autoencoder (conv encoder/decoder; Bernoulli, Gaussian or "
                "discretized-logistic likelihood; beta, KL annealing, free bits; ELBO and "
                "IWAE bounds, active units, anomaly scores)",
)
