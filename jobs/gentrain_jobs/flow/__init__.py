"""Normalizing flows job type: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

    gentrain run flow/debug
    gentrain run flow/debug job.config.architecture=realnvp
    gentrain run flow/debug job.config.dequantization=variational
    gentrain sample runs/flow-debug --set temperature=0.7 --out cooler.png
    gentrain eval runs/flow-debug --metrics nll
    gentrain score runs/flow-debug builtin:digits --split test --out scores.csv

Exact log-likelihood of 8-bit images in bits/dim, under uniform dequantization
(objective.py) or, with job.config.dequantization=variational, the tighter bound of a
learned q(u | x) (Flow++, dequantizer.py); job.config.num_bits=1 models binarized images
(nats per image). Files: layers.py (ActNorm, 1x1 convolution, affine coupling, squeeze),
model.py (the multi-scale flow), objective.py (dequantization and bits/dim), dequantizer.py
(the variational dequantizer).

ActNorm's data-dependent initialisation happens inside the first training forward, on
every rank at once: the per-channel moments are summed over the ranks before they are set
(layers.pooled_moments), so all ranks hold the same statistics; they are buffers, saved in
every checkpoint with an `initialized` flag, so a resumed run never initialises again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.schema import bounds
from gentrain_jobs.flow.dequantizer import VariationalDequantizer, logistic_noise
from gentrain_jobs.flow.model import Flow
from gentrain_jobs.flow.objective import bits_per_dim, dequantize, discrete_nll_nats, quantize

SCORE_SEED = 0
TEMPERATURES = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the rows of the `temperatures` grid


@dataclass
class FlowConfig:
    architecture: Literal["realnvp", "glow"] = "glow"
    levels: int = field(default=3, metadata=bounds(
        ge=1, help="scales (Glow's L); every one but the last factors out half the channels"))
    steps_per_level: int = field(default=32, metadata=bounds(
        ge=1, help="glow: [ActNorm, 1x1 conv, coupling] steps per level (K)"))
    hidden: int = field(default=512, metadata=bounds(ge=1, help="width of the coupling networks"))
    blocks: int = field(default=8, metadata=bounds(ge=0, help="realnvp: residual blocks per coupling network"))
    coupling_scale: Literal["auto", "tanh", "sigmoid"] = field(default="auto", metadata={
        "help": "auto: tanh for realnvp (log s = w tanh h), sigmoid for glow (s = sigmoid(h + 2))"})
    invconv: Literal["lu", "plain"] = field(default="lu", metadata={
        "help": "glow's 1x1 convolution: LU-decomposed (O(C) log-det) or a plain matrix"})
    learned_prior: bool = field(default=True, metadata={
        "help": "Gaussian priors of the factored-out halves from the kept halves, learned top prior"})
    actnorm: bool = field(default=True, metadata={
        "help": "realnvp: an ActNorm after every coupling (in place of batch norm); glow always has them"})
    preprocess: Literal["auto", "logit", "center"] = field(default="auto", metadata={
        "help": "auto: logit for realnvp, center (y - 1/2) for glow"})
    logit_alpha: float = field(default=0.05, metadata=bounds(
        gt=0, lt=0.5, help="logit(alpha + (1 - 2 alpha) y), RealNVP's 0.05"))
    num_bits: int = field(default=8, metadata=bounds(
        ge=1, le=8, help="the 2**num_bits levels per pixel modelled (the top bits of 8-bit pixels); "
                         "1: binarized images (pixels >= 128/255 are 1), likelihoods per binary image"))
    dequantization: Literal["uniform", "variational"] = field(default="uniform", metadata={
        "help": "uniform: y = (k + u) / L, u ~ U[0, 1); variational: u from a learned q(u | x) "
                "(Flow++), a tighter bound on the discrete NLL; sampling is the same"})
    dequantizer_hidden: int = field(default=32, metadata=bounds(
        ge=1, help="variational: width of q's image embedding and coupling networks"))
    dequantizer_steps: int = field(default=4, metadata=bounds(
        ge=1, help="variational: q's checkerboard couplings"))

    @property
    def num_levels(self) -> int:
        return 2 ** self.num_bits

    @property
    def scale(self) -> str:
        if self.coupling_scale != "auto":
            return self.coupling_scale
        return "tanh" if self.architecture == "realnvp" else "sigmoid"

    @property
    def input_map(self) -> str:
        if self.preprocess != "auto":
            return self.preprocess
        return "logit" if self.architecture == "realnvp" else "center"

    def squeezes(self) -> int:
        return self.levels if self.architecture == "glow" else self.levels - 1


@dataclass(frozen=True)
class FlowSampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    temperature: float = field(default=1.0, metadata=bounds(
        ge=0, help="scales every prior's std (Glow samples at 0.7); 0 gives the mode path"))


def build(config: FlowConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    if len(data.shape) != 3:
        raise ValueError(f"job type 'flow' needs images [C, H, W], got samples of shape {list(data.shape)}")
    _, height, width = data.shape
    side = 2 ** config.squeezes()
    if height % side or width % side:
        raise ValueError(f"job.config.levels: {config.levels} {config.architecture} levels squeeze "
                         f"{config.squeezes()} times, so height and width must divide by {side}; "
                         f"the data are {height}x{width}: lower job.config.levels")
    model = Flow(tuple(data.shape), config.architecture, config.levels, config.steps_per_level,
                 config.hidden, config.blocks, config.scale, config.invconv == "lu",
                 config.learned_prior, config.actnorm, config.input_map, config.logit_alpha)
    if config.dequantization == "variational":  # built last: the flow starts as a uniform run's would
        model.dequantizer = VariationalDequantizer(tuple(data.shape), config.num_levels,
                                                   config.dequantizer_hidden, config.dequantizer_steps)
    return {"flow": model}


def bound_log_density(model, config: FlowConfig, x: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per image of the dequantization bound's integrand, per sample: log p(y) with
    uniform u, log p(y) - log q(u | x) with variational u (its logistic noise). `generator`
    None: the global RNG on x's device (training; the engine seeds it per seed, rank, step)."""
    if config.dequantization == "variational":
        log_density, _ = model(image=x, noise=logistic_noise(x.shape, generator, x.device))
    else:
        u = torch.rand(x.shape, generator=generator) if generator is not None else torch.rand(x.shape, device=x.device)
        log_density, _ = model(dequantize(x, u, config.num_levels))
    return log_density.float()


def train_step(ctx, batch) -> dict[str, float]:
    x, num_levels = batch["image"], ctx.config.num_levels
    with ctx.autocast():
        log_density = bound_log_density(ctx.module("flow"), ctx.config, x)
    bpd = bits_per_dim(log_density, x[0].numel(), num_levels)
    loss = bpd.mean()  # bits/dim of the training batch: the objective, scaled per dimension
    ctx.backward(loss, "flow")
    return {"loss": float(loss.detach()), "bits_per_dim": float(loss.detach()), **ctx.step("flow")}


@torch.no_grad()
def evaluate(modules, config: FlowConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Held-out bits/dim and NLL (nats per image) of the images at 2**num_bits levels (8-bit by
    default; per binary image with num_bits=1): one dequantization draw per image, uniform or
    variational (the bound with the learned q)."""
    x, num_levels = batch["image"], config.num_levels
    log_density = bound_log_density(modules["flow"], config, x, generator)
    dims = x[0].numel()
    return {"bits_per_dim": float(bits_per_dim(log_density, dims, num_levels).mean()),
            "nll": float(discrete_nll_nats(log_density, dims, num_levels).mean())}


@torch.no_grad()
def reconstructions(model: Flow, x: torch.Tensor, num_levels: int = 256) -> torch.Tensor:
    """Held-out images and decode(encode(image)), interleaved: equal, as a flow is invertible
    (each image encoded from its dequantization cube's centre, decoded back onto the 8-bit grid)."""
    count = next((n for n in (32, 18, 8, 2) if n <= x.shape[0]), 0)
    if count == 0:
        return x[:0]
    inputs = quantize(dequantize(x[:count].float(), None, num_levels), num_levels)  # the levels modelled
    _, latents = model(dequantize(inputs, None, num_levels))
    outputs = quantize(model.decode(latents), num_levels).to(inputs.device)
    return torch.stack([inputs, outputs], dim=1).flatten(0, 1)


@torch.no_grad()
def temperature_grid(model: Flow, generator: torch.Generator, columns: int = 8,
                     num_levels: int = 256) -> torch.Tensor:
    """One row per temperature in TEMPERATURES, the same noise in every row."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    rows = [quantize(model.sample(columns, t, torch.Generator().manual_seed(seed)), num_levels) for t in TEMPERATURES]
    return torch.cat(rows)


def visuals(modules, config: FlowConfig, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    model = modules["flow"]
    grids = {"reconstructions": reconstructions(model, batch["image"], config.num_levels),
             "temperatures": temperature_grid(model, generator, num_levels=config.num_levels)}
    return {name: images for name, images in grids.items() if len(images)}


@torch.no_grad()
def score(modules, config: FlowConfig, batch) -> dict[str, torch.Tensor]:
    """Per-image bits/dim (one seeded dequantization draw, uniform or variational): lower = more typical."""
    x = batch["image"]
    log_density = bound_log_density(modules["flow"], config, x, torch.Generator().manual_seed(SCORE_SEED))
    return {"bits_per_dim": bits_per_dim(log_density, x[0].numel(), config.num_levels)}


@torch.no_grad()
def sample(modules, config: FlowConfig, request: SampleRequest) -> torch.Tensor:
    y = modules["flow"].sample(request.n, request.settings.temperature, request.generator)
    return quantize(y, config.num_levels)  # onto the grid of 2**num_bits levels, in [0, 1]


JOB = JobType(
    name="flow",
    config=FlowConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    visuals=visuals,
    score=score,
    sampler=FlowSampler,
    # Exact (up to the dequantization bound) negative log-likelihood of the 8-bit images.
    likelihoods={"bits_per_dim": "bits/dim", "nll": "nats"},
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate", "fsdp"), precisions=("fp32", "bf16"),
                      sharded_build=True),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Normalizing flows: RealNVP and Glow (affine coupling, ActNorm with data-dependent "
                "init, invertible 1x1 convolutions, multi-scale; exact bits/dim, sampling temperature)",
)
