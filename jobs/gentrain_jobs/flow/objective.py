"""From 8-bit pixels to bits/dim: uniform dequantization and the discrete likelihood.

Images arrive as k / 255 for 8-bit levels k in {0, ..., 255}. Dequantization gives
y = (k + u) / 256 with u ~ U[0, 1)^D, so y lies in [0, 1)^D and every level k owns the
cube [k / 256, (k + 1) / 256) of volume 256^-D. For a density p on [0, 1]^D,

    log P(k) = log integral over k's cube of p(y) dy >= E_u[log p(y)] - D log 256

(Jensen; Theis et al. 2016), so the discrete negative log-likelihood in nats is
-log p(y) + D log 256 and in bits per dimension

    bpd = (-log p(y) + D log 256) / (D ln 2).

A uniform p on [0, 1]^D (log p = 0) gives exactly 8 bits/dim. The preprocessing that
maps y into the flow (RealNVP's logit with alpha, Glow's shift by -1/2) is part of the
model's log p(y) (gentrain_jobs.flow.model.Flow._to_flow).
"""

from __future__ import annotations

import math

import torch

LEVELS = 256


def levels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels k of images in [0, 1] (x = k / 255)."""
    return torch.round(x.float() * (LEVELS - 1)).clamp(0, LEVELS - 1)


def dequantize(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """y = (k + u) / 256; noise None: u = 1/2 (each cube's centre, for encodings)."""
    k = levels(x)
    u = torch.full_like(k, 0.5) if noise is None else noise.to(k.device, k.dtype)
    return (k + u) / LEVELS


def quantize(y: torch.Tensor) -> torch.Tensor:
    """The image k / 255 whose cube holds y (the inverse of dequantize for any u in [0, 1))."""
    k = torch.floor(y.float() * LEVELS).clamp(0, LEVELS - 1)
    return k / (LEVELS - 1)


def discrete_nll_nats(log_density: torch.Tensor, dims: int) -> torch.Tensor:
    """-log P(k) bound in nats per sample from log p(y) on [0, 1]^D."""
    return -log_density + dims * math.log(LEVELS)


def bits_per_dim(log_density: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-sample bits per dimension of the 8-bit data from log p(y) on [0, 1]^D."""
    return discrete_nll_nats(log_density, dims) / (dims * math.log(2.0))
