"""From 8-bit pixels to bits/dim: uniform dequantization and the discrete likelihood.

Images arrive as j / 255 for 8-bit levels j in {0, ..., 255}. The model is of L = 2^num_bits
levels k (job.config.num_bits, 8 by default: k = j; 1 for binarized images: k = 0 or 1).
Dequantization gives y = (k + u) / L with u ~ U[0, 1)^D, so y lies in [0, 1)^D and every
level k owns the cube [k / L, (k + 1) / L) of volume L^-D. For a density p on [0, 1]^D,

    log P(k) = log integral over k's cube of p(y) dy >= E_u[log p(y)] - D log L

(Jensen; Theis et al. 2016), so the discrete negative log-likelihood in nats is
-log p(y) + D log L (for binarized images: nats per binary image, the unit of binarized
MNIST) and in bits per dimension

    bpd = (-log p(y) + D log L) / (D ln 2).

A uniform p on [0, 1]^D (log p = 0) gives exactly num_bits bits/dim. The preprocessing that
maps y into the flow (RealNVP's logit with alpha, Glow's shift by -1/2) is part of the
model's log p(y) (gentrain_jobs.flow.model.Flow._to_flow).
"""

from __future__ import annotations

import math

import torch

LEVELS = 256  # 8-bit images; job.config.num_bits < 8 models 2 ** num_bits levels (Glow's n_bits)


def levels(x: torch.Tensor, num_levels: int = LEVELS) -> torch.Tensor:
    """The levels k in {0, ..., num_levels - 1} of images in [0, 1] (x = j / 255 for 8-bit j):
    k = floor(j / (256 / num_levels)), the top num_bits bits of j. Two levels: j >= 128 is 1,
    so a binarized image (j = 0 or 255) is its own 0/1 pixels."""
    j = torch.round(x.float() * (LEVELS - 1)).clamp(0, LEVELS - 1)
    return torch.floor(j / (LEVELS // num_levels))


def dequantize(x: torch.Tensor, noise: torch.Tensor | None, num_levels: int = LEVELS) -> torch.Tensor:
    """y = (k + u) / L for L = num_levels; noise None: u = 1/2 (each cube's centre, for encodings)."""
    k = levels(x, num_levels)
    u = torch.full_like(k, 0.5) if noise is None else noise.to(k.device, k.dtype)
    return (k + u) / num_levels


def quantize(y: torch.Tensor, num_levels: int = LEVELS) -> torch.Tensor:
    """The image k / (L - 1) whose cube holds y (the inverse of dequantize for any u in [0, 1))."""
    k = torch.floor(y.float() * num_levels).clamp(0, num_levels - 1)
    return k / (num_levels - 1)


def discrete_nll_nats(log_density: torch.Tensor, dims: int, num_levels: int = LEVELS) -> torch.Tensor:
    """-log P(k) bound in nats per sample from log p(y) on [0, 1]^D: -log p(y) + D log L."""
    return -log_density + dims * math.log(num_levels)


def bits_per_dim(log_density: torch.Tensor, dims: int, num_levels: int = LEVELS) -> torch.Tensor:
    """Per-sample bits per dimension of the L-level data from log p(y) on [0, 1]^D."""
    return discrete_nll_nats(log_density, dims, num_levels) / (dims * math.log(2.0))
