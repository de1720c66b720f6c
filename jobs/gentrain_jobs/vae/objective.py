"""The VAE objective: ELBO = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)), per sample in nats.

Training may weight the KL (beta-VAE, Higgins et al. 2017; annealed, Bowman et al.
2016 and Fu et al. 2019) and floor it per latent dimension (free bits, Kingma et al.
2016); evaluation always reports the true ELBO and the importance-weighted bound
(Burda et al. 2016). Pure functions of tensors, so the mathematics is tested on its
own (tests/unit/test_vae_math.py, tests/unit/test_vae_family.py).
"""

from __future__ import annotations

import math

import torch

from gentrain.samplers import importance
from gentrain_jobs.vae.likelihoods import log_likelihood, to_image

__all__ = ["gaussian_kl", "kl_weight", "free_bits_kl", "elbo_terms", "iwae_bound",
           "log_importance_weights",            "log_likelihood", "to_image"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean, exp(log_var)) || N(0, I)) per latent dimension."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var)


def kl_weight(schedule: str, step: int, total_steps: int, warmup_steps: int = 0,
              cycles: int = 1, ratio: float = 0.5) -> float:
    """The KL weight (multiplies beta) at optimizer step `step` of `total_steps`.

    none: 1. linear: rises from 0 to 1 over `warmup_steps`, then stays at 1.
    cyclical (Fu et al. 2019): `cycles` equal periods over the run; in each the weight
    rises linearly from 0 to 1 over the first `ratio` of the period, then holds at 1,
    so the decoder repeatedly learns to use z before the KL pressure returns.
    """
    if schedule == "none":
        return 1.0
    if schedule == "linear":
        return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    if schedule == "cyclical":
        period = max(total_steps, 1) / max(cycles, 1)
        position = (step % period) / period
        return min(1.0, position / ratio) if ratio > 0 else 1.0
    raise ValueError(f"kl_anneal.schedule: {schedule!r} is not one of none, linear, cyclical")


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """sum_d max(KL_d, free_bits), KL_d averaged over the batch (Kingma et al. 2016, eq. 15).

    A dimension whose batch-mean KL is under the floor costs a constant, so it gets no
    gradient toward the prior and the encoder is free to use it (against posterior
    collapse). With data parallelism the batch is each worker's share.
    """
    return kl_per_dim.mean(dim=0).clamp_min(free_bits).sum()


def elbo_terms(model, x: torch.Tensor, likelihood: str, beta: float = 1.0,
               generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, free_bits: float = 0.0,
               ) -> dict[str, torch.Tensor]:
    """Per-sample reconstruction log-likelihood, KL, ELBO and the training loss.

    `beta` is the whole KL weight (beta times the annealing weight). With free bits the
    KL term of the loss is the batch-level floored KL (the same value in every row, so
    the batch mean of `loss` is the objective); `kl` and `elbo` stay the true values.
    `model` is the network as called (possibly wrapped by DDP or an engine).
    """
    decoded, mean, log_var, log_scale = model(x, generator=generator, noise=noise)
    reconstruction = log_likelihood(x, decoded.float(),
                                    likelihood, None if log_scale is None else log_scale.float())
    kl_per_dim = gaussian_kl(mean.float(), log_var.float())
    kl = kl_per_dim.sum(dim=1)
    penalised = kl if free_bits <= 0 else free_bits_kl(kl_per_dim, free_bits).expand_as(kl)
    return {
        "reconstruction": reconstruction,
        "kl": kl,
        "elbo": reconstruction - kl,
        "loss": -(reconstruction - beta * penalised),
    }


def _log_normal(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return (-_HALF_LOG_2PI - 0.5 * log_var - 0.5 * (z - mean).pow(2) / log_var.exp()).sum(-1)


def log_importance_weights(model, x: torch.Tensor, samples: int, chunk: int = 100,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x, z_i) - log q(z_i | x) for z_i ~ q(z | x): [samples, batch], nats.

    The decoder sees `chunk` * batch images at a time, which bounds memory for
    k = 1000. `model` is the unwrapped ConvVAE.
    """
    mean, log_var = (t.float() for t in model.encode(x))
    std = torch.exp(0.5 * log_var)
    batch = x.shape[0]

    def propose(n: int, gen: torch.Generator | None):
        # Drawn on the CPU (where the generator lives), then moved to the model's device.
        z = mean + std * torch.randn((n, *mean.shape), generator=gen).to(mean.device)  # [n, B, latent]
        return z, _log_normal(z, mean, log_var)

    def log_px(z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        decoded, log_scale = model.decode_params(z.reshape(n * batch, -1).to(x.dtype))
        repeated = x.unsqueeze(0).expand(n, *x.shape).reshape(n * batch, *x.shape[1:])
        return log_likelihood(repeated, decoded.float(), model.likelihood,
                              None if log_scale is None else log_scale.float()).view(n, batch)

    def log_prior(z: torch.Tensor) -> torch.Tensor:
        return (-_HALF_LOG_2PI - 0.5 * z.pow(2)).sum(-1)

    return importance.log_importance_weights(propose, log_prior, log_px, samples, generator, chunk)


def iwae_bound(model, x: torch.Tensor, samples: int, chunk: int = 100,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x): per sample, nats.

    k = `samples`; a lower bound on log p(x) that tightens as k grows (Burda et al.
    2016) and is an ELBO estimate at k = 1.
    """
    log_weights = log_importance_weights(model, x, samples, chunk, generator)
    return torch.logsumexp(log_weights, dim=0) - math.log(samples)
