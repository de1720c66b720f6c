"""Decoder likelihoods p(x | z): Bernoulli, Gaussian and discretized logistic.

Images arrive as floats in [0, 1] (8-bit values divided by 255). Each likelihood is
summed over pixels, one value per sample, in nats.

- bernoulli: the decoder gives logits; grey levels act as soft targets, so the
  "likelihood" of non-binary data is a cross-entropy, not a normalised probability of
  the 8-bit image (its bits/dim are of the binarised / soft model).
- gaussian: decoder means with one shared learned log-std: a density on [0, 1]^D.
- logistic: a discretized logistic per pixel (PixelCNN++, Salimans et al. 2017; the
  IAF-VAE of Kingma et al. 2016) with a per-pixel log-scale predicted by the decoder.
  It puts a probability on each of the 256 levels, so its bits/dim are those of the
  8-bit data and compare with published numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian", "logistic")
LEVELS = 256
BIN_HALF_WIDTH = 0.5 / (LEVELS - 1)  # in [0, 1] units
# Below this bin probability the difference of two sigmoids loses its digits in fp32;
# there the density at the bin centre times the bin width is the better estimate.
_SMALL_BIN = 1e-5


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor,
                                  log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per pixel, x on the 8-bit grid {0, 1/255, ..., 1}.

    Each level owns the interval of width 1/255 around it; the lowest level owns
    (-inf, half a bin] and the highest [1 - half a bin, inf), so the 256 bin
    probabilities sum to 1 whatever the mean and scale.
    """
    x = torch.round(x * (LEVELS - 1)) / (LEVELS - 1)  # exact grid values, so the edge tests hold
    centred = x - mean
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (centred + BIN_HALF_WIDTH)
    lower = inv_scale * (centred - BIN_HALF_WIDTH)
    # log sigmoid(upper) and log(1 - sigmoid(lower)) via softplus: stable in the tails.
    log_cdf_upper = upper - F.softplus(upper)
    log_survival_lower = -F.softplus(lower)
    bin_mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    middle = inv_scale * centred
    log_density_centre = middle - log_scale - 2.0 * F.softplus(middle)
    interior = torch.where(bin_mass > _SMALL_BIN,
                           torch.log(bin_mass.clamp_min(1e-12)),
                           log_density_centre + math.log(2 * BIN_HALF_WIDTH))
    lowest, highest = x < BIN_HALF_WIDTH, x > 1.0 - BIN_HALF_WIDTH
    return torch.where(lowest, log_cdf_upper, torch.where(highest, log_survival_lower, interior))


def log_likelihood(x: torch.Tensor, decoded: torch.Tensor, likelihood: str,
                   log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | z) summed over pixels, one value per sample.

    bernoulli: `decoded` are logits. gaussian: means with a shared `log_scale`.
    logistic: means with a per-pixel `log_scale` of the same shape.
    """
    if likelihood == "bernoulli":
        per_pixel = -F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
    elif likelihood == "gaussian":
        per_pixel = (-0.5 * math.log(2 * math.pi) - log_scale
                     - 0.5 * ((x - decoded) / log_scale.exp()).pow(2))
    elif likelihood == "logistic":
        per_pixel = discretized_logistic_log_prob(x, decoded, log_scale)
    else:
        raise ValueError(f"likelihood {likelihood!r} is not one of {', '.join(LIKELIHOODS)}")
    return per_pixel.flatten(1).sum(dim=1)


def to_image(decoded: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The decoder's mean image in [0, 1] (the logistic's location, clamped)."""
    if likelihood == "bernoulli":
        return torch.sigmoid(decoded)
    return decoded.clamp(0.0, 1.0)
