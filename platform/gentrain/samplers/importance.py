"""The importance-weighted log-likelihood estimate of a latent-variable model (Burda et al. 2016):

    log p(x) ≈ log (1/k) sum_i p(z_i) p(x | z_i) / q(z_i | x),   z_i ~ q(z | x),

a lower bound in expectation that tightens as k grows (the ELBO at k = 1).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# propose(n, generator) -> (z [n, B, ...], log q(z | x) [n, B])
Propose = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def log_importance_weights(propose: Propose, log_prior: Callable, log_likelihood: Callable, samples: int,
                           generator: torch.Generator | None = None, chunk: int = 100) -> torch.Tensor:
    """log p(z_i) + log p(x | z_i) - log q(z_i | x): [samples, B]. Proposals are drawn `chunk`
    at a time (bounding memory at large k), in order from `generator`."""
    parts = []
    for start in range(0, samples, chunk):
        z, log_q = propose(min(chunk, samples - start), generator)
        parts.append(log_likelihood(z) + log_prior(z) - log_q)
    return torch.cat(parts)


def importance_log_likelihood(propose: Propose, log_prior: Callable, log_likelihood: Callable, samples: int,
                              generator: torch.Generator | None = None, chunk: int = 100) -> torch.Tensor:
    """The k-sample estimate of log p(x) per data point, [B] (k = `samples`)."""
    log_w = log_importance_weights(propose, log_prior, log_likelihood, samples, generator, chunk)
    return torch.logsumexp(log_w, dim=0) - math.log(samples)
