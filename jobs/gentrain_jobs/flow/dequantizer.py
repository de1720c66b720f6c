"""Variational dequantization (Ho et al. 2019, Flow++ sec. 3.1): a learned q(u | x) in place
of the uniform noise, job.config.dequantization=variational.

    u ~ q(u | x) on (0, 1)^D,  y = (k + u) / L,
    log P(k) >= E_q[log p(y) - log q(u | x)] - D log L

(objective.py has the uniform case, log q = 0). The bound is tight when q(u | x) is p's
density restricted to k's cube, so a learned q closes part of the gap that uniform noise
leaves; training maximises the bound over the flow and q together.

q is a small conditional flow: logistic noise eps, `steps` affine checkerboard couplings whose
networks see the partly transformed noise and a convolutional embedding of the image, then
a squashing sigmoid:

    z = couplings(eps | embed(x)),  u = m + (1 - 2m) sigmoid(z),  m = 2^-15
    log q(u | x) = log Logistic(eps) - sum log_s - sum log[(1 - 2m) sigmoid'(z)]

Logistic noise because sigmoid(eps) is then exactly uniform: every coupling starts as the
identity (zero convolutions), so an untrained q is the uniform dequantization, shrunk onto
[m, 1 - m] (log q = -log(1 - 2m) per dimension, 9e-5 bits/dim). The margin m keeps k + u
below k + 1 in float32 for every level k < 256 (a sigmoid rounds to exactly 1 from z = 17
on), so y never leaves k's cube and quantize(y) is x.

The dequantizer lives inside the Flow module (`Flow.dequantizer`), so every strategy trains
it with the flow's optimizer; sampling, encoding and decoding never use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gentrain_jobs.flow.layers import ZeroConv, checkerboard, fp32, wide
from gentrain_jobs.flow.objective import levels

MARGIN = 2.0 ** -15  # u in [MARGIN, 1 - MARGIN]: k + u < k + 1 in float32 for every k < 256


def logistic_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard logistic draws logit(v), v uniform on (0, 1) (torch.rand's [0, 1) shifted by
    half its 2^-24 spacing, so never 0 or 1)."""
    v = torch.rand(shape, generator=generator) if generator is not None else torch.rand(shape, device=device)
    v = v.to(device) + 2.0 ** -25
    return torch.log(v) - torch.log1p(-v)


def logistic_log_prob(eps: torch.Tensor) -> torch.Tensor:
    """sum over entries of log Logistic(eps; 0, 1) = log sigmoid(eps) + log sigmoid(-eps), per sample."""
    return (F.logsigmoid(eps) + F.logsigmoid(-eps)).flatten(1).sum(1)


class ConditionalCoupling(nn.Module):
    """z_b = z_b * exp(log_s) + t with (log_s, t) from [z * mask, embedding]: an affine
    checkerboard coupling (layers.AffineCoupling's) whose network also sees the image.
    log_s = w tanh(h), w learned per channel (RealNVP's scale)."""

    def __init__(self, channels: int, size: tuple[int, int], parity: int, embedding: int, hidden: int):
        super().__init__()
        self.register_buffer("mask", checkerboard(*size, parity))
        self.net = nn.Sequential(nn.Conv2d(channels + embedding, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(), ZeroConv(hidden, 2 * channels))
        self.tanh_gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, z: torch.Tensor, embedding: torch.Tensor):
        z, mask = wide(z), self.mask
        h = wide(self.net(torch.cat([z * mask, embedding.to(z.dtype)], 1)))
        with fp32(z):
            log_s = wide(self.tanh_gain) * torch.tanh(h[:, 0::2]) * (1 - mask)
            shift = h[:, 1::2] * (1 - mask)
            return z * mask + (1 - mask) * (z * log_s.exp() + shift), log_s.flatten(1).sum(1)


class VariationalDequantizer(nn.Module):
    """q(u | x): `forward(image, eps)` -> (u in [m, 1 - m]^D, log q(u | image) per sample), for
    images in [0, 1] at `num_levels` levels and logistic noise eps of the images' shape."""

    def __init__(self, shape: tuple[int, int, int], num_levels: int, hidden: int = 32, steps: int = 4):
        super().__init__()
        channels, height, width = shape
        self.num_levels = num_levels
        self.embed = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU())
        self.couplings = nn.ModuleList(
            ConditionalCoupling(channels, (height, width), i % 2, hidden, hidden) for i in range(steps))

    def forward(self, image: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = wide(eps)
        scaled = levels(image, self.num_levels) / max(self.num_levels - 1, 1) - 0.5  # the levels, centred
        embedding = self.embed(scaled.to(eps.dtype))
        z, log_q = eps, logistic_log_prob(eps)
        for coupling in self.couplings:
            z, logdet = coupling(z, embedding)
            log_q = log_q - logdet
        with fp32(z):
            u = MARGIN + (1 - 2 * MARGIN) * torch.sigmoid(z)
            squash = math.log(1 - 2 * MARGIN) + F.logsigmoid(z) + F.logsigmoid(-z)  # log du/dz
            return u, log_q - squash.flatten(1).sum(1)
