"""Gaussian diffusion job type (Ho et al. 2020; Song et al. 2021; Nichol & Dhariwal 2021).

    gentrain run diffusion/debug
    gentrain run diffusion/debug job.config.target=v job.config.schedule=cosine
    gentrain sample runs/diffusion-debug --set sampler=ddim --set steps=50 --out ddim.png
    gentrain sample runs/diffusion-debug --set sampler=ode --set steps=25 --out ode.png
    gentrain sample runs/diffusion-debug --labels 3 --set guidance=3   # class_conditional: true
    gentrain eval runs/diffusion-debug --metrics nll

A UNet (images) or residual MLP (vectors) learns the simple loss: the mean squared error of
its target (eps, x0 or v) at a uniformly drawn step. evaluate gives the variational bound
on held-out data, `bpd_bound` in bits/dim (images) and `nll_bound` in nats per sample, plus
the loss. One network serves four samplers (samplers.py: ddpm, ddim, pc, ode); the
visuals inpaint the lower half of held-out images.

Files: schedules.py (the process, pure functions), unet.py (networks), bound.py (the
variational bound), samplers.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from gentrain.launch.console import worker_print
from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.schema import bounds
from gentrain.visual import inpainting_grid
from gentrain_jobs.diffusion import samplers
from gentrain_jobs.diffusion import schedules as S
from gentrain_jobs.diffusion.bound import variational_bound
from gentrain_jobs.diffusion.likelihood import dequantization_nats, dequantize, ode_log_likelihood
from gentrain_jobs.diffusion.unet import ResidualMLP, UNet

INPAINT_SEED = 0


@dataclass
class DiffusionConfig:
    timesteps: int = field(default=1000, metadata=bounds(ge=2, help="T, the steps of the forward process"))
    schedule: Literal["linear", "cosine", "ve"] = field(default="linear", metadata={
        "help": "linear or cosine betas (VP), or ve: geometric noise levels sigma_min..sigma_max (VE, Song et al.)"})
    sigma_min: float = field(default=0.01, metadata=bounds(gt=0, help="schedule ve: the smallest noise level"))
    sigma_max: float = field(default=50.0, metadata=bounds(
        gt=0, help="schedule ve: the largest (about the largest distance between two data points)"))
    target: Literal["eps", "x0", "v"] = field(default="eps", metadata={"help": "what the network predicts"})
    variance: Literal["small", "large"] = field(default="small", metadata={
        "help": "the reverse process's fixed variance: the posterior's (small) or beta (large)"})
    channels: int = field(default=128, metadata=bounds(ge=1, help="UNet base width"))
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2], metadata={
        "help": "width multiplier per resolution level; each level after the first halves the image"})
    res_blocks: int = field(default=2, metadata=bounds(ge=1, help="residual blocks per level"))
    attention_resolutions: list[int] = field(default_factory=lambda: [16], metadata={
        "help": "feature-map sizes (pixels) with self-attention after each block"})
    attention_heads: int = field(default=1, metadata=bounds(ge=1))
    dropout: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    mlp_width: int = field(default=128, metadata=bounds(ge=1, help="vector data: the residual MLP's width"))
    mlp_depth: int = field(default=3, metadata=bounds(ge=1, help="vector data: residual blocks"))
    class_conditional: bool = field(default=False, metadata={
        "help": "a label embedding; labels are dropped with label_dropout for classifier-free guidance"})
    label_dropout: float = field(default=0.1, metadata=bounds(
        ge=0, lt=1, help="fraction of training labels replaced by the null label (guidance needs > 0)"))
    ema_decay: float = field(default=0.9999, metadata=bounds(
        ge=0, lt=1, help="EMA of the weights for evaluation and sampling; 0 turns it off"))
    bound_timesteps: int = field(default=32, metadata=bounds(
        ge=0, help="evaluation: steps drawn per sample for the bound's Monte Carlo sum over t (T x their "
                   "mean, unbiased); 0 sums all T", evaluation=True))
    ode_likelihood_steps: int = field(default=0, metadata=bounds(
        ge=0, help="evaluation: also -log p by the probability flow ODE (ode_nll, ode_bpd) over this many "
                   "trained levels, 2 network calls and backward passes each; 0 off", evaluation=True))
    ode_divergence: Literal["hutchinson", "exact"] = field(default="hutchinson", metadata={
        "help": "the ODE likelihood's divergence: Hutchinson's estimate or exact (one backward pass per "
                "dimension: small vectors)", "evaluation": True})
    ode_probes: int = field(default=1, metadata=bounds(ge=1, help="Hutchinson probes per sample", evaluation=True))

    def __post_init__(self):
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"job.config.channel_mult: {self.channel_mult} needs one or more positive multipliers")
        if self.schedule == "linear":
            S.linear_betas(self.timesteps)  # raises naming job.config.timesteps when T is too small
        if self.schedule == "ve":
            S.ve_sigmas(2, self.sigma_min, self.sigma_max)  # raises naming both when out of order


@dataclass(frozen=True)
class DiffusionSampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    sampler: Literal["ddpm", "ddim", "pc", "ode"] = "ddpm"
    sde: Literal["auto", "vp", "ve"] = field(default="auto", metadata={
        "help": "pc: the reverse SDE, variance preserving or exploding; auto: ve for schedule ve, else vp"})
    steps: int = field(default=0, metadata=bounds(ge=0, help="steps spread over the T trained ones; 0: all T"))
    eta: float = field(default=0.0, metadata=bounds(ge=0, help="ddim: 0 deterministic, 1 DDPM's variance"))
    guidance: float = field(default=1.0, metadata=bounds(
        ge=0, help="classifier-free guidance: eps_null + w (eps_label - eps_null); 1 is plain conditional"))
    temperature: float = field(default=1.0, metadata=bounds(gt=0, help="scales every injected noise"))
    snr: float = field(default=0.16, metadata=bounds(gt=0, help="pc: the Langevin corrector's signal-to-noise ratio"))
    corrector_steps: int = field(default=1, metadata=bounds(ge=0, help="pc: Langevin steps per noise level"))
    solver: Literal["heun", "euler"] = field(default="heun", metadata={"help": "ode: Heun (2nd order) or Euler"})
    clip_denoised: bool = field(default=True, metadata={"help": "ddpm/ddim on images: clip x0_hat to [-1, 1]"})
    chunk: int = field(default=256, metadata=bounds(ge=1, help="samples drawn at once"))
    resample: int = field(default=5, metadata=bounds(
        ge=1, help="inpainting: RePaint's resampling, each step done U times (1: plain replacement)"))


def build(config: DiffusionConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    classes = data.num_classes if config.class_conditional else 0
    if config.class_conditional and data.num_classes < 1:
        raise ValueError("job.config.class_conditional is true but the data set has no labels (num_classes=0); "
                         "set it to false or pack labelled data")
    if data.kind == "vector":
        return {"denoiser": ResidualMLP(data.shape[0], config.mlp_width, config.mlp_depth, classes)}
    if data.kind != "image":
        raise ValueError(f"job type 'diffusion' trains on image or vector data, not {data.kind!r}")
    return {"denoiser": UNet(tuple(data.shape), config.channels, tuple(config.channel_mult), config.res_blocks,
                             tuple(config.attention_resolutions), config.attention_heads, config.dropout, classes)}


def schedule_of(config: DiffusionConfig) -> S.Schedule:
    return S.Schedule(S.make_betas(config.schedule, config.timesteps, config.sigma_min, config.sigma_max))


def _data(batch) -> tuple[torch.Tensor, bool]:
    """The batch's samples in the model's space: images to [-1, 1], vectors as they are."""
    if "image" in batch:
        return batch["image"] * 2 - 1, True
    return batch["x"], False


def _labels(model, labels, dropout: float = 0.0):
    if not model.num_classes:
        return None
    if dropout > 0:
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < dropout,
                             torch.full_like(labels, model.num_classes), labels)
    return labels


def diffusion_loss(model, config: DiffusionConfig, x0, labels, generator=None):
    """The simple loss per sample [B]: MSE of the target at t ~ U{0..T-1}, eps ~ N(0, I)."""
    alpha_bar = schedule_of(config).alpha_bar
    t = torch.randint(0, config.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = S.q_sample(x0, t, noise, alpha_bar)
    target = S.training_target(config.target, x0, noise, S.gather(alpha_bar, t, x0))
    output = model(x_t, t, labels)
    return F.mse_loss(output.float(), target.float(), reduction="none").flatten(1).mean(1)


def train_step(ctx, batch) -> dict[str, float]:
    config = ctx.config
    x0, _ = _data(batch)
    model = ctx.module("denoiser")
    labels = _labels(ctx.plain("denoiser"), batch.get("label"), config.label_dropout)
    with ctx.autocast():
        loss = diffusion_loss(model, config, x0, labels).mean()
    ctx.backward(loss, "denoiser")
    stepped = ctx.step("denoiser")
    if config.ema_decay > 0:
        ctx.ema_update("denoiser", config.ema_decay)
    return {"loss": float(loss.detach()), **stepped}


def eps_predictor(model, config: DiffusionConfig, labels=None, guidance: float = 1.0):
    """eps(x_t, t) from the network's target; with labels and guidance != 1 the guided
    eps_null + w (eps_label - eps_null), both halves in one batch."""
    alpha_bar = schedule_of(config).alpha_bar
    dtype = next(model.parameters()).dtype

    def eps_fn(x, t):  # x in any dtype (the bound runs in float64): the network sees its own
        a = S.gather(alpha_bar, t, x)
        if labels is None or guidance == 1.0:
            return S.to_eps(config.target, model(x.to(dtype), t, labels).to(x.dtype), x, a)
        null = torch.full_like(labels, model.num_classes)
        output = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([labels, null])).to(x.dtype)
        eps_label, eps_null = S.to_eps(config.target, output, torch.cat([x, x]), torch.cat([a, a])).chunk(2)
        return eps_null + guidance * (eps_label - eps_null)
    return eps_fn


@torch.no_grad()
def evaluate(modules, config: DiffusionConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Held-out: the loss, and the variational bound (nats per sample; bits/dim for images)."""
    model = modules["denoiser"]
    x0, discrete = _data(batch)
    labels = _labels(model, batch.get("label"))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    loss = diffusion_loss(model, config, x0, labels, generator)
    bound = variational_bound(eps_predictor(model, config, labels), x0.double(),
                              schedule_of(config), generator, variance=config.variance, discrete=discrete,
                              timesteps=config.bound_timesteps)
    metrics = {"loss": float(loss.mean()), "nll_bound": float(bound["total"].mean()),
               "prior_kl": float(bound["prior"].mean())}
    if discrete:
        metrics["bpd_bound"] = metrics["nll_bound"] / (x0[0].numel() * math.log(2))
    if config.ode_likelihood_steps > 0:
        metrics.update(ode_likelihood(model, config, batch, labels, generator))
    return metrics


def ode_likelihood(model, config: DiffusionConfig, batch, labels, generator) -> dict[str, float]:
    """-log p of held-out data by the probability flow ODE (likelihood.py): nats per sample;
    images dequantized uniformly, so ode_nll bounds the 256 levels' NLL and ode_bpd is in
    bits/dim like bpd_bound."""
    if "image" in batch:
        x = dequantize(batch["image"], generator)
        offset = dequantization_nats(x[0].numel())
    else:
        x, offset = batch["x"].double(), 0.0
    result = ode_log_likelihood(eps_predictor(model, config, labels), x, schedule_of(config).alpha_bar,
                                steps=config.ode_likelihood_steps, divergence=config.ode_divergence,
                                probes=config.ode_probes, generator=generator)
    nll = -result["log_p"] + offset
    metrics = {"ode_nll": float(nll.mean())}
    if "image" in batch:
        metrics["ode_bpd"] = metrics["ode_nll"] / (x[0].numel() * math.log(2))
    return metrics


def draw(modules, config: DiffusionConfig, n: int, generator, settings: DiffusionSampler, labels=None,
         known=None, mask=None) -> torch.Tensor:
    """n samples in the model's space ([-1, 1] for images), chunk by chunk."""
    model = modules["denoiser"]
    parameter = next(model.parameters())
    alpha_bar = schedule_of(config).alpha_bar
    image = len(model.shape) == 3
    chunks = []
    for start in range(0, n, settings.chunk):
        size = min(settings.chunk, n - start)
        part = slice(start, start + size)
        eps_fn = eps_predictor(model, config, None if labels is None else labels[part].to(parameter.device),
                               settings.guidance)
        chunks.append(samplers.sample(
            eps_fn, alpha_bar, (size, *model.shape), generator, sampler=settings.sampler, sde=sde_of(config, settings),
            steps=settings.steps or None, eta=settings.eta, variance=config.variance, snr=settings.snr,
            corrector_steps=settings.corrector_steps, solver=settings.solver, temperature=settings.temperature,
            clip=1.0 if image and settings.clip_denoised else None, device=parameter.device,
            known=None if known is None else known[part], mask=None if mask is None else mask[part],
            resample=settings.resample))
    return torch.cat(chunks)


def sde_of(config: DiffusionConfig, settings: DiffusionSampler) -> str:
    if settings.sde == "auto":
        return "ve" if config.schedule == "ve" else "vp"
    return settings.sde


def _request_labels(model, request: SampleRequest):
    labels = request.labels
    if labels is not None and not model.num_classes:
        raise ValueError("labels given, but this model was trained without job.config.class_conditional: true; "
                         "leave the labels out")
    if model.num_classes and labels is None:
        labels = torch.randint(0, model.num_classes, (request.n,), generator=request.generator)
    return labels


@torch.no_grad()
def sample(modules, config: DiffusionConfig, request: SampleRequest) -> torch.Tensor:
    """Samples in data space (images in [0, 1]); prints the rate (samples/s) of every call."""
    model = modules["denoiser"]
    settings = request.settings
    if settings.guidance != 1.0 and not model.num_classes:
        raise ValueError(f"job.sampling.guidance: {settings.guidance} needs a class-conditional model "
                         "(job.config.class_conditional: true); use guidance: 1")
    labels = _request_labels(model, request)
    started = time.perf_counter()
    x = draw(modules, config, request.n, request.generator, settings, labels)
    seconds = time.perf_counter() - started
    steps = len(samplers.timesteps(config.timesteps, settings.steps or config.timesteps))
    calls = samplers.network_evaluations(settings.sampler, steps, settings.corrector_steps, settings.solver)
    worker_print(f"diffusion sample: {request.n} x {settings.sampler} ({steps} steps, {calls} network calls "
                 f"each) in {seconds:.2f} s ({request.n / max(seconds, 1e-9):.1f} samples/s)")
    return ((x + 1) / 2).clamp(0, 1).float() if len(model.shape) == 3 else x.float()


@torch.no_grad()
def visuals(modules, config: DiffusionConfig, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """inpainting: (original, lower half masked grey, completion) triples of held-out images
    (DDPM, 100 steps, RePaint's resampling U = 5)."""
    if "image" not in batch or len(batch["image"]) == 0:
        return {}
    images = batch["image"][:12 if len(batch["image"]) >= 12 else 3]
    model = modules["denoiser"]
    labels = batch.get("label")
    labels = labels[:len(images)] if model.num_classes and labels is not None else None
    mask = torch.ones_like(images)
    mask[:, :, images.shape[2] // 2:] = 0
    masked = images * mask + 0.5 * (1 - mask)
    if generator is None:
        generator = torch.Generator().manual_seed(INPAINT_SEED)
    settings = DiffusionSampler(sampler="ddpm", steps=min(config.timesteps, 100), resample=5)
    completed = draw(modules, config, len(images), generator, settings, labels, known=images * 2 - 1, mask=mask)
    completed = ((completed + 1) / 2).clamp(0, 1).to(images.device)
    return {"inpainting": inpainting_grid(images, masked, completed)}


JOB = JobType(
    name="diffusion",
    config=DiffusionConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    visuals=visuals,
    sampler=DiffusionSampler,
    # Upper bounds on the negative log-likelihood (the ELBO), not exact likelihoods.
    # ode_nll/ode_bpd (with job.config.ode_likelihood_steps > 0): the probability flow ODE's
    # -log p, exact up to the solver and (images) the dequantization bound.
    likelihoods={"nll_bound": "nats", "bpd_bound": "bits/dim", "ode_nll": "nats", "ode_bpd": "bits/dim"},
    class_conditional=True,  # when trained with job.config.class_conditional: true
    data_kinds=("image", "vector"),
    supports=Supports(strategies=("ddp", "deepspeed", "accelerate", "fsdp"), precisions=("fp32", "bf16"),
                      sharded_build=True),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Gaussian diffusion (DDPM): UNet, linear/cosine schedules, eps/x0/v targets, EMA, classifier-free "
                "guidance; VP (linear/cosine) and VE schedules; variational bound and probability-flow ODE "
                "likelihood in bits/dim; DDPM, DDIM, VP/VE predictor-corrector and ODE samplers; inpainting",
)
