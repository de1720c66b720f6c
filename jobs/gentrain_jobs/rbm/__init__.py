"""Restricted Boltzmann machine job type (Bernoulli-Bernoulli), trained by CD-k or PCD.

    gentrain run rbm/debug
    gentrain run rbm/debug job.config.persistent=true job.config.cd_steps=5
    gentrain sample runs/rbm-debug --set steps=2000 --out gibbs.png
    gentrain eval runs/rbm-debug --metrics nll

Images are binarized (pixel > 1/2, or Bernoulli draws with their grey level as the
probability) and flattened into the visible layer. The held-out negative log-likelihood is
F(v) + log Z in nats per image, with log Z estimated by annealed importance sampling
(Salakhutdinov & Murray 2008) from the visible-bias-only RBM fit to the training data's
pixel marginals (model.py). AIS's estimate of log Z is unbiased in Z and so tends to
underestimate log Z: the reported NLL is then, in expectation, optimistic by that gap;
`eval/log_z_stderr` gives its delta-method standard error.

State: the data marginals are buffers (saved in every checkpoint). PCD's persistent chains
are per rank and NOT saved: a resumed run restarts them from its first batch, as a fresh
run does (the chains forget their start within a few hundred updates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports
from gentrain.samplers import rbm_gibbs
from gentrain.samplers.gibbs import hidden_given_visible, visible_given_hidden
from gentrain.schema import bounds
from gentrain_jobs.rbm.model import RBM, ais_log_z, base_log_z


@dataclass
class RBMConfig:
    hidden: int = field(default=500, metadata=bounds(ge=1, help="hidden units"))
    cd_steps: int = field(default=1, metadata=bounds(ge=1, help="Gibbs sweeps per update (the k of CD-k)"))
    persistent: bool = field(default=False, metadata={
        "help": "persistent CD: the negative chains continue across updates instead of restarting at the data"})
    binarize: Literal["threshold", "bernoulli"] = field(default="bernoulli", metadata={
        "help": "threshold: pixel > 1/2; bernoulli: a fresh binary draw per use (evaluation draws are seeded)"})
    init_std: float = field(default=0.01, metadata=bounds(gt=0, help="weights ~ N(0, init_std^2)"))
    ais_betas: int = field(default=1000, metadata=bounds(
        ge=2, help="intermediate temperatures of AIS for log Z at evaluation (S&M use 14,500)"))
    ais_schedule: Literal["linear", "salakhutdinov"] = field(default="linear", metadata={
        "help": "AIS temperatures: linear in beta, or spaced as Salakhutdinov & Murray (denser towards 1)"})
    ais_chains: int = field(default=100, metadata=bounds(ge=2, help="AIS runs (the error bars shrink as 1/sqrt)"))
    ais_seed: int = field(default=0, metadata=bounds(
        ge=0, help="AIS's randomness: the same weights give the same log Z on every rank and evaluation"))


@dataclass(frozen=True)
class RBMSampler:
    """`job.sampling` (or `gentrain sample --set ...`)."""

    steps: int = field(default=1000, metadata=bounds(ge=1, help="block Gibbs sweeps from the start"))
    start: Literal["base", "uniform"] = field(default="base", metadata={
        "help": "base: independent Bernoullis with the data's pixel marginals; uniform: each pixel 1/2"})
    mean_field: bool = field(default=True, metadata={
        "help": "return p(v = 1 | h) of the last sweep (grey images) instead of the binary state"})


def build(config: RBMConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    return {"rbm": RBM(data.shape, config.hidden, config.init_std)}


def binarize(images: torch.Tensor, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
    v = images.flatten(1).float()
    if how == "threshold":
        return (v > 0.5).float()
    return (torch.rand(v.shape, generator=generator).to(v.device) < v).float()


def _generator_from_global() -> torch.Generator:
    """The step's randomness comes from the global RNG (the engine seeds it per seed, rank, step)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))


def train_step(ctx, batch) -> dict[str, float]:
    config = ctx.config
    plain = ctx.plain("rbm")
    v = binarize(batch["image"], config.binarize)
    plain.observe(v)
    start = v
    if config.persistent:
        if plain.chains is None or plain.chains.shape != v.shape:
            plain.chains = v.clone()
        start = plain.chains
    # Full precision: a free energy is a sum over every pixel and hidden unit (no autocast).
    data_f, model_f, negatives = ctx.module("rbm")(v, start, config.cd_steps, _generator_from_global())
    if config.persistent:
        plain.chains = negatives.detach()
    loss = data_f.mean() - model_f.mean()  # its gradient is the CD-k update (model.py)
    ctx.backward(loss, "rbm")
    metrics = {"loss": float(loss.detach()), "free_energy_data": float(data_f.detach().mean()),
               "free_energy_model": float(model_f.detach().mean())}
    if not config.persistent:
        # CD-k's negatives start at the data: pixels flipped by k sweeps, a common monitor.
        metrics["reconstruction_error"] = float((negatives - v).abs().sum(1).mean())
    return {**metrics, **ctx.step("rbm")}


def _log_z(model: RBM, config: RBMConfig) -> tuple[float, float]:
    """AIS's log Z, cached per weights: evaluate is called once per held-out batch."""
    key = (config.ais_betas, config.ais_schedule, config.ais_chains, config.ais_seed,
           *(float(t.double().sum()) for t in (model.weight, model.visible_bias, model.hidden_bias)),
           float(model.weight.double().abs().sum()), float(model.data_count))
    cached = getattr(model, "_log_z_cache", None)
    if cached is None or cached[0] != key:
        result = ais_log_z(model.params(), model.base_visible_bias(), config.ais_betas, config.ais_chains,
                           torch.Generator().manual_seed(config.ais_seed), config.ais_schedule)
        cached = (key, (result.log_z, result.log_z_stderr))
        model._log_z_cache = cached
    return cached[1]


@torch.no_grad()
def evaluate(modules, config: RBMConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Held-out NLL in nats per image: F(v) + log Z (AIS); beside it the independent-Bernoulli
    baseline (the AIS base, the data's pixel marginals) and log Z's standard error."""
    model = modules["rbm"]
    v = binarize(batch["image"], config.binarize, generator).to(model.weight.device)
    log_z, stderr = _log_z(model, config)
    free = model.free_energy(v).double()
    base = model.base_visible_bias().double()
    base_nll = -(v.double() @ base) + torch.nn.functional.softplus(base).sum()
    return {"nll": float(free.mean() + log_z), "log_z": log_z, "log_z_stderr": stderr,
            "free_energy": float(free.mean()), "baseline_nll": float(base_nll.mean())}


@torch.no_grad()
def sample(modules, config: RBMConfig, request: SampleRequest) -> torch.Tensor:
    model, settings = modules["rbm"], request.settings
    visible = model.weight.shape[0]
    p = torch.sigmoid(model.base_visible_bias()) if settings.start == "base" else torch.full((visible,), 0.5)
    p = p.float().cpu().expand(request.n, -1)
    v0 = (torch.rand(p.shape, generator=request.generator) < p).float().to(model.weight.device)
    params = model.params()
    v = rbm_gibbs(params, v0, settings.steps - 1, request.generator).samples
    h, _ = hidden_given_visible(params, v, request.generator)  # the last sweep, keeping p(v | h)
    v, probs = visible_given_hidden(params, h, request.generator)
    return (probs if settings.mean_field else v).view(request.n, *model.shape)


JOB = JobType(
    name="rbm",
    config=RBMConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    sampler=RBMSampler,
    likelihoods={"nll": "nats", "baseline_nll": "nats"},
    # fp32 only: free energies sum hundreds of terms, and the data-marginal counts are float64
    # buffers that a bf16 cast of the module would ruin. No ZeRO-3: AIS and sampling read the
    # weights outside the module's forward (ZeRO 0-2 keep them whole on every rank).
    supports=Supports(strategies=("ddp", "accelerate", "deepspeed", "fsdp"), precisions=("fp32",),
                      zero_stages=(0, 1, 2)),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Bernoulli-Bernoulli RBM: CD-k / persistent CD, block Gibbs sampling, "
                "held-out NLL in nats with log Z by annealed importance sampling (Salakhutdinov & Murray 2008)",
)

__all__ = ["JOB", "RBMConfig", "RBMSampler", "base_log_z", "binarize", "build", "evaluate", "sample", "train_step"]
