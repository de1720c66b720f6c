"""Energy networks E_θ(x) -> [B] (low energy = likely), and the per-rank replay buffer.

conv: strided 3x3 convolutions with LeakyReLU and a sum-pooled linear head, for images;
mlp: for vector data. No normalisation layers: the energy of a sample must not depend on
the rest of its batch (Langevin runs on data and negatives separately).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class ConvEnergy(nn.Module):
    def __init__(self, shape: tuple[int, ...], channels: list[int]):
        super().__init__()
        layers, previous = [], shape[0]
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(previous, width, 3, stride=1 if i == 0 else 2, padding=1), nn.LeakyReLU(0.2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(2.0 * x - 1.0).sum((2, 3))).squeeze(-1)


class MLPEnergy(nn.Module):
    def __init__(self, dims: int, hidden: int, depth: int = 3):
        super().__init__()
        layers, previous = [], dims
        for _ in range(depth):
            layers += [nn.Linear(previous, hidden), nn.SiLU()]
            previous = hidden
        self.net = nn.Sequential(*layers, nn.Linear(previous, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(2.0 * x.flatten(1) - 1.0).squeeze(-1)


class ReplayBuffer:
    """Past negatives (Du & Mordatch 2019): each chain restarts from a stored sample, or from
    uniform noise with probability `reinit` (and always while the buffer is empty). A ring of
    `capacity` samples on the rank's device. Per rank and never checkpointed: a resumed run
    starts from an empty buffer (noise), as a fresh one does."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        self.capacity, self.shape = capacity, tuple(shape)
        self.samples: torch.Tensor | None = None
        self.count = 0
        self.position = 0

    def starts(self, n: int, reinit: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand((n, *self.shape), generator=generator).to(device)
        if self.count == 0:
            return noise
        fresh = torch.rand(n, generator=generator) < reinit
        index = torch.randint(0, self.count, (n,), generator=generator)
        stored = self.samples[index.to(self.samples.device)].to(device)
        return torch.where(fresh.to(device).view(-1, *([1] * len(self.shape))), noise, stored)

    def push(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.samples is None:
            self.samples = torch.empty((self.capacity, *self.shape), device=x.device, dtype=x.dtype)
        n = min(len(x), self.capacity)
        slots = (self.position + torch.arange(n)) % self.capacity
        self.samples[slots.to(x.device)] = x[:n]
        self.position = (self.position + n) % self.capacity
        self.count = min(self.count + n, self.capacity)


def energy_network(shape: tuple[int, ...], arch: str, channels: list[int], hidden: int) -> nn.Module:
    if arch == "conv":
        if len(shape) != 3:
            raise ValueError(f"job.config.arch: 'conv' needs images [C, H, W], got samples of shape {list(shape)}; "
                             "use arch: mlp for vector data")
        return ConvEnergy(shape, channels)
    return MLPEnergy(math.prod(shape), hidden)
