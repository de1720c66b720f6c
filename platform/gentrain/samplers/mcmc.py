"""Markov chain Monte Carlo over an energy E(x), target density pi(x) ∝ exp(-E(x)).

Conventions: `energy(x) -> [B]`, one chain per row of `x0`; noise drawn from `generator` on
the CPU, then moved to the chains' device. The energy's parameters get no gradients here:
gradients are taken with respect to x only (torch.autograd.grad with inputs=x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Energy = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Chain:
    """The chains' final states and diagnostics."""

    samples: torch.Tensor          # [B, ...]
    acceptance: float              # mean acceptance rate over chains and steps (1.0: no MH test)
    accepted: torch.Tensor         # [B] per-chain acceptance rate


def normal_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def uniform(n: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float32).to(like.device)


def energy_and_grad(energy: Energy, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E(x) [B] and dE/dx, detached, whether or not grad mode is on outside."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = energy(x)
        (grad,) = torch.autograd.grad(value.sum(), [x])
    return value.detach(), grad.detach()


def _accept(log_ratio: torch.Tensor, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Metropolis test per chain: log u < log ratio, u ~ U(0, 1)."""
    return torch.log(uniform(log_ratio.shape[0], like, generator)) < log_ratio


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def random_walk_metropolis(energy: Energy, x0: torch.Tensor, steps: int, step_size: float,
                           generator: torch.Generator) -> Chain:
    """Gaussian random-walk proposals y = x + step_size * xi, accepted with min(1, exp(E(x) - E(y)))."""
    x = x0.detach()
    with torch.no_grad():
        e = energy(x)
        accepted = torch.zeros(x.shape[0], device=x.device)
        for _ in range(steps):
            y = x + step_size * normal_like(x, generator)
            e_y = energy(y)
            ok = _accept(e - e_y, x, generator)
            x, e = _where(ok, y, x), torch.where(ok, e_y, e)
            accepted += ok.float()
    rate = accepted / max(steps, 1)
    return Chain(x, float(rate.mean()), rate)


def langevin(energy: Energy, x0: torch.Tensor, steps: int, step_size: float, generator: torch.Generator,
             noise: float | None = None, bounds: tuple[float, float] | None = None) -> Chain:
    """Unadjusted Langevin: x <- x - step_size * dE/dx + noise * xi.

    noise defaults to sqrt(2 step_size), the discretised Langevin diffusion whose stationary
    law tends to exp(-E) as step_size -> 0 (biased at finite steps: no MH test). Short-run
    EBM training (Du & Mordatch 2019) decouples the two (a large step, small noise);
    `bounds` clamps every state (images in [0, 1]).
    """
    sigma = math.sqrt(2.0 * step_size) if noise is None else noise
    x = x0.detach()
    for _ in range(steps):
        _, grad = energy_and_grad(energy, x)
        x = x - step_size * grad + sigma * normal_like(x, generator)
        if bounds is not None:
            x = x.clamp(*bounds)
    ones = torch.ones(x.shape[0], device=x.device)
    return Chain(x, 1.0, ones)


def mala(energy: Energy, x0: torch.Tensor, steps: int, step_size: float, generator: torch.Generator) -> Chain:
    """Metropolis-adjusted Langevin: the Langevin proposal y = x - eps grad E(x) + sqrt(2 eps) xi,
    accepted with min(1, pi(y) q(x | y) / (pi(x) q(y | x))), q(y | x) = N(y; x - eps grad E(x), 2 eps I).
    The proposal is asymmetric, so the q ratio is part of the test: exact for any eps."""
    eps = step_size
    x = x0.detach()
    e, g = energy_and_grad(energy, x)
    accepted = torch.zeros(x.shape[0], device=x.device)
    for _ in range(steps):
        y = x - eps * g + math.sqrt(2.0 * eps) * normal_like(x, generator)
        e_y, g_y = energy_and_grad(energy, y)
        log_q_forward = -_sum_rows((y - x + eps * g) ** 2) / (4.0 * eps)   # log q(y | x) + const
        log_q_backward = -_sum_rows((x - y + eps * g_y) ** 2) / (4.0 * eps)  # log q(x | y) + const
        ok = _accept(e - e_y + log_q_backward - log_q_forward, x, generator)
        x, e, g = _where(ok, y, x), torch.where(ok, e_y, e), _where(ok, g_y, g)
        accepted += ok.float()
    rate = accepted / max(steps, 1)
    return Chain(x, float(rate.mean()), rate)


def hmc(energy: Energy, x0: torch.Tensor, steps: int, step_size: float, generator: torch.Generator,
        leapfrog_steps: int = 10) -> Chain:
    """Hamiltonian Monte Carlo with unit mass: per step, fresh momentum p ~ N(0, I),
    `leapfrog_steps` leapfrog steps of `step_size`, then accepted with
    min(1, exp(H(x, p) - H(x', p'))), H = E(x) + |p|^2 / 2."""
    x = x0.detach()
    e, g = energy_and_grad(energy, x)
    accepted = torch.zeros(x.shape[0], device=x.device)
    for _ in range(steps):
        p = normal_like(x, generator)
        h_start = e + 0.5 * _sum_rows(p ** 2)
        y, g_y = x, g
        p = p - 0.5 * step_size * g_y
        for leap in range(leapfrog_steps):
            y = y + step_size * p
            e_y, g_y = energy_and_grad(energy, y)
            if leap < leapfrog_steps - 1:
                p = p - step_size * g_y
        p = p - 0.5 * step_size * g_y
        h_end = e_y + 0.5 * _sum_rows(p ** 2)
        log_ratio = torch.nan_to_num(h_start - h_end, nan=-math.inf)  # a diverged trajectory is rejected
        ok = _accept(log_ratio, x, generator)
        x, e, g = _where(ok, y, x), torch.where(ok, e_y, e), _where(ok, g_y, g)
        accepted += ok.float()
    rate = accepted / max(steps, 1)
    return Chain(x, float(rate.mean()), rate)


KERNELS = ("langevin", "mala", "hmc", "rwmh")


def kernel(name: str, step_size: float, leapfrog_steps: int = 10) -> Callable:
    """One transition `(energy, x, generator) -> x` of the named kernel: AIS's transitions."""
    if name == "langevin":
        return lambda energy, x, generator: langevin(energy, x, 1, step_size, generator).samples
    if name == "mala":
        return lambda energy, x, generator: mala(energy, x, 1, step_size, generator).samples
    if name == "hmc":
        return lambda energy, x, generator: hmc(energy, x, 1, step_size, generator, leapfrog_steps).samples
    if name == "rwmh":
        return lambda energy, x, generator: random_walk_metropolis(energy, x, 1, step_size, generator).samples
    raise ValueError(f"sampler kernel {name!r} is not one of {', '.join(KERNELS)}")
