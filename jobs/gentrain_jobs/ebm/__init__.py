"""Energy-based model job type: contrastive divergence with short-run Langevin dynamics and a
replay buffer (Du & Mordatch 2019, "Implicit generation and generalization in EBMs").

    gentrain run ebm/debug
    gentrain run ebm/debug job.config.sampler=mala
    gentrain sample runs/ebm-debug --set sampler=mala --set steps=100 --out mala.png

p(x) ∝ exp(-E(x)). Each step draws negatives: chains start from the replay buffer (or uniform
noise with probability `reinit`, 5%), run `steps` Langevin steps x <- x - step_size dE/dx +
noise * xi clamped to [0, 1] (the data's range), and go back into the buffer. The loss

    mean E(x_data) - mean E(x_neg) + alpha (mean E(x_data)^2 + mean E(x_neg)^2)

has the contrastive-divergence gradient plus an L2 penalty that keeps the energies near 0.
This step samples exp(-E / T) with T = noise^2 / (2 step_size) (a low temperature:
Du & Mordatch's energies differ by hundredths). `sampler: mala` keeps the same proposal and
adds the Metropolis test for exp(-E / T) (gentrain.samplers.mala on E / T at step noise^2 / 2),
so its chains are exact for the model, at the cost of rejections. `sampler: hmc` targets the
same exp(-E / T) by Hamiltonian Monte Carlo (gentrain.samplers.hmc on E / T, leapfrog step
`noise`, `leapfrog_steps` of them per transition; one leapfrog step is that MALA step).

The replay buffer is per rank and NOT checkpointed (model.ReplayBuffer): a resumed run
refills it from noise, so its first few hundred updates see shorter-mixed negatives, exactly
as at the start of training; saving it would add capacity x sample bytes per rank to every
checkpoint. Sampling runs on the unwrapped network (ctx.plain), so sharded parameters
(ZeRO-3) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gentrain.registry import DataInfo, JobType, SampleRequest, Supports, batch_inputs
from gentrain.samplers import hmc, langevin, mala
from gentrain.schema import bounds
from gentrain_jobs.ebm.model import ReplayBuffer, energy_network


@dataclass
class EBMConfig:
    arch: Literal["conv", "mlp"] = field(default="conv", metadata={"help": "conv for images, mlp for vectors"})
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    hidden: int = field(default=128, metadata=bounds(ge=1, help="mlp: width"))
    sampler: Literal["langevin", "mala", "hmc"] = "langevin"
    leapfrog_steps: int = field(default=5, metadata=bounds(ge=1, help="hmc: leapfrog steps per transition"))
    steps: int = field(default=60, metadata=bounds(ge=1, help="Langevin steps per update (short-run)"))
    step_size: float = field(default=10.0, metadata=bounds(gt=0, help="multiplies dE/dx (Du & Mordatch: 10)"))
    noise: float = field(default=0.005, metadata=bounds(ge=0, help="langevin: std of the added noise"))
    buffer_size: int = field(default=10000, metadata=bounds(ge=1, help="replay buffer capacity per rank"))
    reinit: float = field(default=0.05, metadata=bounds(ge=0, le=1, help="share of chains restarted from noise"))
    alpha: float = field(default=1.0, metadata=bounds(ge=0, help="weight of the energies' L2 penalty"))

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"job.config.channels {self.channels} must be a non-empty list of positive widths")


@dataclass(frozen=True)
class EBMSampler:
    """`job.sampling` (or `gentrain sample --set ...`): chains from uniform noise."""

    sampler: Literal["langevin", "mala", "hmc"] = "langevin"
    leapfrog_steps: int = field(default=0, metadata=bounds(ge=0, help="hmc: 0: job.config.leapfrog_steps"))
    steps: int = field(default=200, metadata=bounds(ge=1, help="steps from noise"))
    step_size: float = field(default=0.0, metadata=bounds(ge=0, help="0: job.config.step_size"))
    noise: float = field(default=-1.0, metadata={"help": "langevin noise std; negative: job.config.noise"})


def build(config: EBMConfig, data: DataInfo) -> dict[str, torch.nn.Module]:
    network = energy_network(tuple(data.shape), config.arch, config.channels, config.hidden)
    network.data_shape = tuple(data.shape)  # what `sample` draws
    return {"energy": network}


def temperature(step_size: float, noise: float) -> float:
    """The Langevin step x - step_size dE/dx + noise xi samples exp(-E / T), T = noise^2 / (2 step_size)
    (in the small-step limit): Du & Mordatch's large step and small noise mean a low temperature."""
    return noise ** 2 / (2.0 * step_size)


def run_chains(energy, x0: torch.Tensor, sampler: str, steps: int, step_size: float, noise: float,
               generator: torch.Generator, leapfrog_steps: int = 5):
    """`steps` Langevin steps; `mala`: the very same proposal, Metropolis-adjusted for exp(-E / T)
    (MALA on E / T at step noise^2 / 2), so the chain's target is exact; `hmc`: HMC on E / T with
    leapfrog step `noise` (one leapfrog step is that MALA step). MALA's and HMC's states are not clamped."""
    if sampler in ("mala", "hmc"):
        if noise <= 0:
            raise ValueError(f"sampler {sampler} needs noise > 0 (job.config.noise or --set noise=...): "
                             "the Metropolis test is for exp(-E / T), T = noise^2 / (2 step_size)")
        scale = 1.0 / temperature(step_size, noise)
        if sampler == "hmc":
            return hmc(lambda x: scale * energy(x), x0, steps, noise, generator, leapfrog_steps)
        return mala(lambda x: scale * energy(x), x0, steps, noise ** 2 / 2.0, generator)
    return langevin(energy, x0, steps, step_size, generator, noise=noise, bounds=(0.0, 1.0))


def _buffer(module: torch.nn.Module, config: EBMConfig, shape) -> ReplayBuffer:
    buffer = getattr(module, "replay_buffer", None)
    if buffer is None or buffer.shape != tuple(shape):
        buffer = ReplayBuffer(config.buffer_size, tuple(shape))
        module.replay_buffer = buffer  # a plain attribute: per rank, not in the state dict
    return buffer


def train_step(ctx, batch) -> dict[str, float]:
    config = ctx.config
    x = batch_inputs(batch)
    plain = ctx.plain("energy")
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))  # from the seeded global RNG
    buffer = _buffer(plain, config, x.shape[1:])
    starts = buffer.starts(len(x), config.reinit, x.device, generator)
    chain = run_chains(plain, starts, config.sampler, config.steps, config.step_size, config.noise, generator,
                       config.leapfrog_steps)
    negatives = chain.samples.detach()
    buffer.push(negatives)
    with ctx.autocast():
        energies = ctx.module("energy")(torch.cat([x, negatives])).float()
    e_data, e_model = energies[:len(x)], energies[len(x):]
    contrastive = e_data.mean() - e_model.mean()
    regulariser = e_data.pow(2).mean() + e_model.pow(2).mean()
    loss = contrastive + config.alpha * regulariser
    ctx.backward(loss, "energy")
    return {"loss": float(loss.detach()), "energy_data": float(e_data.detach().mean()),
            "energy_model": float(e_model.detach().mean()), "contrastive": float(contrastive.detach()),
            "acceptance": chain.acceptance, **ctx.step("energy")}


def evaluate(modules, config: EBMConfig, batch, generator: torch.Generator) -> dict[str, float]:
    """Mean energy of held-out data and of uniform noise (a trained model puts the data lower)."""
    model = modules["energy"]
    x = batch_inputs(batch)
    with torch.no_grad():
        noise = torch.rand(x.shape, generator=generator).to(x.device)
        e_data, e_noise = model(x).float().mean(), model(noise).float().mean()
    return {"energy_data": float(e_data), "energy_noise": float(e_noise), "energy_gap": float(e_noise - e_data)}


def sample(modules, config: EBMConfig, request: SampleRequest) -> torch.Tensor:
    model, settings = modules["energy"], request.settings
    device = next(model.parameters()).device
    x0 = torch.rand((request.n, *model.data_shape), generator=request.generator).to(device)
    step = settings.step_size or config.step_size
    noise = config.noise if settings.noise < 0 else settings.noise
    chain = run_chains(model, x0, settings.sampler, settings.steps, step, noise, request.generator,
                       settings.leapfrog_steps or config.leapfrog_steps)
    return chain.samples.clamp(0.0, 1.0).detach()


JOB = JobType(
    name="ebm",
    config=EBMConfig,
    build=build,
    train_step=train_step,
    sample=sample,
    evaluate=evaluate,
    sampler=EBMSampler,
    data_kinds=("image", "vector"),
    # Langevin runs on the unwrapped network in fp32 outside autocast: no ZeRO-3 (sharded
    # weights), and no DeepSpeed bf16 (its bf16 weights would meet fp32 chains).
    supports=Supports(strategies=("ddp", "accelerate", "deepspeed", "fsdp"), precisions=("fp32", "bf16"),
                      zero_stages=(0, 1, 2),
                      excluded=(("deepspeed", "bf16", "Langevin sampling runs the unwrapped network on fp32 "
                                 "chains; DeepSpeed's bf16 weights do not take them: use strategy.precision=fp32"),)),
    spec_dir=str(Path(__file__).parent / "specs"),
    description="Energy-based model: contrastive divergence with short-run Langevin (or MALA) "
                "and a replay buffer (Du & Mordatch 2019)",
)

__all__ = ["EBMConfig", "EBMSampler", "JOB", "build", "evaluate", "run_chains", "sample", "train_step"]
