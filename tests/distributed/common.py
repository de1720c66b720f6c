"""Shared pieces of the distributed tests: a tiny VAE job on fixed data, any strategy.

Every function here runs inside `harness.run_world` ranks (module level, picklable).
"""

from __future__ import annotations

import dataclasses

import torch

from gentrain.optim import make_optimizer
from gentrain.spec import JobSpec
from gentrain.strategies import StepSettings, make_strategy
from gentrain.validation import from_dict
from gentrain_jobs.vae.model import ConvVAE
from gentrain_jobs.vae.objective import elbo_terms

SHAPE = (1, 8, 8)
GLOBAL_BATCH = 8
LATENT = 4


def make_spec(strategy: dict | None = None, **train) -> JobSpec:
    """A validated spec (as the VAE) with the given strategy section and train overrides."""
    spec = from_dict({"job": {"type": "vae"}, "train": {"steps": 100, "batch_size": GLOBAL_BATCH, "grad_clip": 1.0,
                                "optimizer": {"name": "adamw", "lr": 3e-3},
                                "schedule": {"name": "cosine", "warmup_steps": 2}, **train}})
    # Strategy sections are applied after validation: these tests exercise strategies the
    # VAE may not list in `supports` yet.
    return dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, **(strategy or {})))


def global_batches(steps: int, micro: int) -> list[torch.Tensor]:
    """The same data for every run: one [GLOBAL_BATCH] tensor per micro-step."""
    generator = torch.Generator().manual_seed(7)
    return [torch.rand(GLOBAL_BATCH, *SHAPE, generator=generator) for _ in range(steps * micro)]


def build_strategy(spec: JobSpec):
    torch.manual_seed(0)  # identical initial weights on every rank and in every run
    model = ConvVAE(SHAPE, LATENT, [8, 16], "bernoulli")
    model.enable_grad_checkpointing(spec.strategy.grad_checkpointing)  # as the loop does
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
    strategy.setup({"vae": model}, {"vae": make_optimizer(model.parameters(), spec.train.optimizer)})
    return strategy


def train(strategy, spec: JobSpec, rank: int, world: int, first: int, last: int) -> list[float]:
    """Optimizer steps first..last-1; returns the global mean loss of each step."""
    accum = spec.train.grad_accum
    batches = global_batches(last, accum)
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(first, last):
        step_loss = torch.zeros(())
        for micro in range(accum):
            x = batches[step * accum + micro][rank * share:(rank + 1) * share]
            with strategy.micro_step(is_last=micro == accum - 1):
                # The global batch's noise, sliced like the data: any world size compares.
                noise = torch.randn(GLOBAL_BATCH, LATENT, generator=torch.Generator().manual_seed(
                    1000 * step + micro))[rank * share:(rank + 1) * share]
                with strategy.autocast():
                    loss = elbo_terms(strategy.module("vae"), x.to(_input_dtype(strategy)),
                                      "bernoulli", noise=noise.to(_input_dtype(strategy)))
                    loss = loss["loss"].float().mean()
                strategy.backward(loss, "vae")
                strategy.step("vae")
            step_loss += loss.detach() / accum
        losses.append(float(strategy.all_reduce(step_loss)))
    return losses


def _input_dtype(strategy) -> torch.dtype:
    return strategy.input_dtype


def flat_params(strategy) -> torch.Tensor:
    state = strategy.export_state_dicts()["vae"]
    return torch.cat([value.flatten().float() for _, value in sorted(state.items())])


def run_losses(rank: int, world: int, strategy_section: dict, train_overrides: dict, steps: int):
    spec = make_spec(strategy_section, **train_overrides)
    strategy = build_strategy(spec)
    return train(strategy, spec, rank, world, 0, steps), flat_params(strategy)


def run_resume(rank: int, world: int, strategy_section: dict, steps: int, directory: str):
    """2N steps straight vs N steps, save, a fresh strategy, load, N more."""
    spec = make_spec(strategy_section)
    straight = build_strategy(spec)
    train(straight, spec, rank, world, 0, 2 * steps)
    first = build_strategy(spec)
    train(first, spec, rank, world, 0, steps)
    first.write_checkpoint(directory, rank)
    first.barrier()
    resumed = build_strategy(spec)
    resumed.load(directory)
    train(resumed, spec, rank, world, steps, 2 * steps)
    return float((flat_params(straight) - flat_params(resumed)).abs().max())


def run_gan(rank: int, world: int, strategy_section: dict, steps: int):
    """A GAN-shaped pair: two networks, two optimizers, alternating steps on 2-D data."""
    spec = make_spec(strategy_section, grad_clip=None)
    torch.manual_seed(0)
    networks = {
        "generator": torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)),
        "discriminator": torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)),
    }
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in networks.items()}
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
    strategy.setup(networks, {name: make_optimizer(net.parameters(), spec.train.optimizer)
                              for name, net in networks.items()})
    generator = torch.Generator().manual_seed(100 + rank)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    dtype = _input_dtype(strategy)
    d_losses, g_losses = [], []
    for _ in range(steps):
        real = (torch.randn(16, 2, generator=generator) * 0.1 + 2.0).to(dtype)
        z = torch.randn(16, 4, generator=generator).to(dtype)
        with strategy.micro_step(is_last=True):
            with strategy.autocast():
                fake = strategy.module("generator")(z).detach()
                real_logits = strategy.module("discriminator")(real).float()
                fake_logits = strategy.module("discriminator")(fake).float()
                d_loss = bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
            strategy.backward(d_loss, "discriminator")
            strategy.step("discriminator")
            with strategy.autocast():
                logits = strategy.module("discriminator")(strategy.module("generator")(z)).float()
                g_loss = bce(logits, torch.ones_like(logits))
            strategy.backward(g_loss, "generator")
            strategy.step("generator")
        d_losses.append(float(d_loss))
        g_losses.append(float(g_loss))
    exported = strategy.export_state_dicts()
    moved = {name: any(not torch.equal(old.float(), new.float()) for old, new in
                       zip(before[name], exported[name].values()))
             for name in networks}
    return d_losses, g_losses, moved


def close(actual, expected, rtol: float, atol: float = 0.0):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=rtol, atol=atol)
