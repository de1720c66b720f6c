"""The VAE objective: ELBO = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)), per sample in nats.

Pure functions of tensors, so the mathematics is tested on its own
(tests/unit/test_vae_math.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mean, exp(log_var)) || N(0, I)) per latent dimension."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var)


def log_likelihood(x: torch.Tensor, decoded: torch.Tensor, likelihood: str,
                   log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | z) summed over pixels, one value per sample.

    bernoulli: `decoded` are logits; x in [0, 1] (grey levels act as soft targets).
    gaussian:  `decoded` are means, with one shared learned log-std `log_scale`.
    """
    if likelihood == "bernoulli":
        per_pixel = -F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
    else:
        per_pixel = (-0.5 * math.log(2 * math.pi) - log_scale
                     - 0.5 * ((x - decoded) / log_scale.exp()).pow(2))
    return per_pixel.flatten(1).sum(dim=1)


def elbo_terms(model, x: torch.Tensor, likelihood: str, beta: float = 1.0,
               generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample reconstruction log-likelihood, KL and the (beta-weighted) loss.

    `model` is the network as called (possibly wrapped by DDP or an engine).
    """
    decoded, mean, log_var, log_scale = model(x, generator=generator, noise=noise)
    reconstruction = log_likelihood(x, decoded.float(), likelihood, log_scale)
    kl = gaussian_kl(mean.float(), log_var.float()).sum(dim=1)
    return {
        "reconstruction": reconstruction,
        "kl": kl,
        "elbo": reconstruction - kl,
        "loss": -(reconstruction - beta * kl),
    }


def to_image(decoded: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The decoder's mean image in [0, 1]."""
    if likelihood == "bernoulli":
        return torch.sigmoid(decoded)
    return decoded.clamp(0.0, 1.0)
