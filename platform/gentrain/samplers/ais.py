"""Annealed importance sampling (Neal 2001): log Z of an unnormalised target.

A path of unnormalised log-densities f_beta, beta from 0 (a tractable base, log Z_0 known and
samples exact) to 1 (the target). Chains start from the base; at each beta_k the log weight
gains f_{beta_k}(x) - f_{beta_{k-1}}(x), then x moves by a transition that leaves
exp(f_{beta_k}) invariant. Z_1 / Z_0 = E[w], so log Z_1 ≈ log Z_0 + log mean exp(log w):
unbiased in Z, a stochastic lower bound in log Z (Jensen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

LogDensity = Callable[[float, torch.Tensor], torch.Tensor]   # (beta, x) -> f_beta(x), [B]
Transition = Callable[[float, torch.Tensor, torch.Generator], torch.Tensor]  # (beta, x, g) -> x'


@dataclass
class AISResult:
    log_weights: torch.Tensor   # [chains]
    log_z: float                # log Z_0 + log mean exp(log w)
    log_z_stderr: float         # delta-method standard error of log_z: std(w) / (mean(w) sqrt(n))
    samples: torch.Tensor       # the chains' final states (approximately from the target)

    @property
    def effective_sample_size(self) -> float:
        w = torch.softmax(self.log_weights.double(), 0)
        return float(1.0 / (w ** 2).sum())


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def log_z_with_error(log_weights: torch.Tensor, log_z_base: float) -> tuple[float, float]:
    lw = log_weights.double()
    n = lw.shape[0]
    w = torch.exp(lw - lw.max())
    stderr = float(w.std(unbiased=True) / (w.mean() * math.sqrt(n))) if n > 1 else math.inf
    return float(log_z_base + log_mean_exp(lw)), stderr


def geometric_path(base_energy: Callable, target_energy: Callable) -> LogDensity:
    """f_beta(x) = -((1 - beta) E_0(x) + beta E_1(x))."""
    return lambda beta, x: -((1.0 - beta) * base_energy(x) + beta * target_energy(x))


def energy_kernel(path: LogDensity, kernel: Callable) -> Transition:
    """A transition for AIS from an energy kernel `(energy, x, generator) -> x`
    (gentrain.samplers.mcmc.kernel): the kernel run on E_beta = -f_beta."""
    return lambda beta, x, generator: kernel(lambda y: -path(beta, y), x, generator)


def linear_betas(count: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, count, dtype=torch.float64)


def salakhutdinov_betas(count: int) -> torch.Tensor:
    """`count` temperatures spaced as Salakhutdinov & Murray 2008 (500 in [0, 0.5), 4,000 in
    [0.5, 0.9), 10,000 in [0.9, 1] of 14,500): denser where the distributions change fastest."""
    low = max(1, round(count * 500 / 14500))
    middle = max(1, round(count * 4000 / 14500))
    high = max(2, count - low - middle)
    return torch.cat([torch.linspace(0.0, 0.5, low + 1, dtype=torch.float64)[:-1],
                      torch.linspace(0.5, 0.9, middle + 1, dtype=torch.float64)[:-1],
                      torch.linspace(0.9, 1.0, high, dtype=torch.float64)])


def annealed_importance_sampling(path: LogDensity, transition: Transition, x0: torch.Tensor,
                                 betas: Sequence[float] | torch.Tensor, log_z_base: float,
                                 generator: torch.Generator) -> AISResult:
    """Run AIS from exact base samples `x0` [chains, ...] along `betas` (0 = base ... 1 = target).

    `transition(beta, x, generator)` must leave exp(path(beta, .)) invariant (any MCMC kernel:
    `energy_kernel(path, mcmc.kernel("hmc", 0.1))`, or exact Gibbs for an RBM).
    """
    betas = [float(b) for b in betas]
    if len(betas) < 2 or betas[0] != 0.0 or betas[-1] != 1.0:
        raise ValueError("AIS betas must run from 0.0 (the base) to 1.0 (the target), at least two of them")
    x = x0.detach()
    log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for previous, beta in zip(betas[:-1], betas[1:]):
            log_w += (path(beta, x) - path(previous, x)).double()
            if beta < 1.0:  # the final transition would not change the weights
                x = transition(beta, x, generator)
    log_z, stderr = log_z_with_error(log_w, log_z_base)
    return AISResult(log_w, log_z, stderr, x)
