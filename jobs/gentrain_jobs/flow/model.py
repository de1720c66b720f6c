"""Multi-scale flows: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

    y in [0, 1]^D (dequantized pixels) --preprocess--> x --levels--> z's, one per level

RealNVP level (not the last): 3 checkerboard couplings, squeeze, 3 channel couplings,
factor out half the channels; the last level: 4 checkerboard couplings. An ActNorm
follows every coupling when `actnorm` is on (it stands in for RealNVP's batch
normalisation, which depends on the batch in training). Scales tanh, ResNet nets.

Glow level: squeeze, K steps of [ActNorm, invertible 1x1 convolution, affine coupling
(channel halves)], then factor out half the channels (not after the last level).

`forward(y)` returns log p(y) in nats per sample, a density on [0, 1]^D that includes the
preprocessing's Jacobian (RealNVP's logit with alpha, or Glow's shift by -1/2), and the
latents. A factored-out half and the top latent are N(0, I), or, with `learned_prior`,
Gaussians whose mean and log-std come from a zero convolution of the kept half (Glow's
split prior) and learned per-channel values (Glow's `learntop`).

With a variational dequantizer (dequantizer.py), `forward(image=x, noise=eps)` draws
u ~ q(u | x) from the noise, y = (k + u) / L, and returns log p(y) - log q(u | x): training
and evaluation go through the module's own call, so DDP, DeepSpeed (ZeRO-3's hooks) and
FSDP see and train q's parameters with the flow's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gentrain_jobs.flow.dequantizer import VariationalDequantizer
from gentrain_jobs.flow.layers import (ActNorm, AffineCoupling, InvConv1x1, Squeeze, ZeroConv, fp32,
                                       gaussian_log_prob, wide)
from gentrain_jobs.flow.objective import dequantize


class Split(nn.Module):
    """Factor out the second half of the channels: (kept, z, log p(z | kept))."""

    def __init__(self, channels: int, learned: bool):
        super().__init__()
        self.kept = channels // 2
        self.factored = channels - self.kept
        self.prior = ZeroConv(self.kept, 2 * self.factored) if learned else None

    def _mean_log_std(self, kept: torch.Tensor, z_channels: int):
        if self.prior is None:
            zeros = kept.new_zeros(kept.shape[0], z_channels, *kept.shape[2:], dtype=wide(kept).dtype)
            return zeros, zeros
        h = wide(self.prior(kept))
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x):
        kept, z = x[:, :self.kept], x[:, self.kept:]
        mean, log_std = self._mean_log_std(kept, z.shape[1])
        with fp32(x):
            return kept, z, gaussian_log_prob(wide(z), mean, log_std)

    def draw(self, kept, temperature: float, generator) -> torch.Tensor:
        mean, log_std = self._mean_log_std(kept, self.factored)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return mean + temperature * log_std.exp() * noise


class Level(nn.Module):
    """A list of invertible layers and, except at the top, a Split after them."""

    def __init__(self, layers: list[nn.Module], split: Split | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.split = split


class Flow(nn.Module):
    def __init__(self, shape: tuple[int, int, int], architecture: str = "glow", levels: int = 3,
                 steps: int = 32, hidden: int = 512, blocks: int = 8, scale: str = "sigmoid",
                 lu: bool = True, learned_prior: bool = True, actnorm: bool = True,
                 preprocess: str = "center", logit_alpha: float = 0.05):
        super().__init__()
        self.shape = tuple(shape)
        # None: uniform dequantization, done by the caller; the job type's `build` attaches a
        # VariationalDequantizer after the flow's layers (so they draw the same initial weights)
        self.dequantizer: VariationalDequantizer | None = None
        self.preprocess, self.alpha = preprocess, logit_alpha
        channels, height, width = shape
        net = "resnet" if architecture == "realnvp" else "cnn"
        built = []
        for level in range(levels):
            last = level == levels - 1
            layers: list[nn.Module] = []

            def coupling(mask, parity):
                layers.append(AffineCoupling(channels, (height, width), mask, parity, scale, net, hidden, blocks))
                if actnorm and architecture == "realnvp":
                    layers.append(ActNorm(channels))

            if architecture == "realnvp":
                for i in range(4 if last else 3):
                    coupling("checkerboard", i % 2)
                if not last:
                    layers.append(Squeeze())
                    channels, height, width = channels * 4, height // 2, width // 2
                    for i in range(3):
                        coupling("channel", i % 2)
            else:
                layers.append(Squeeze())
                channels, height, width = channels * 4, height // 2, width // 2
                for _ in range(steps):
                    layers += [ActNorm(channels), InvConv1x1(channels, lu=lu)]
                    coupling("channel", 0)
            split = None if last else Split(channels, learned_prior)
            built.append(Level(layers, split))
            if split is not None:
                channels = split.kept
        self.levels = nn.ModuleList(built)
        self.top_shape = (channels, height, width)
        self.learned_prior = learned_prior
        if learned_prior:
            self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.top_log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @property
    def dims(self) -> int:
        return math.prod(self.shape)

    # -- the preprocessing: [0, 1] -> the flow's input --------------------------------------
    def _to_flow(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, log|dx/dy|) per sample."""
        if self.preprocess == "center":
            return y - 0.5, y.new_zeros(y.shape[0])
        s = self.alpha + (1 - 2 * self.alpha) * y
        x = torch.log(s) - torch.log1p(-s)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        return x, logdet

    def _from_flow(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "center":
            return x + 0.5
        return (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha)

    def _top(self, like: torch.Tensor):
        if not self.learned_prior:
            zeros = wide(like).new_zeros(like.shape[0], *self.top_shape)
            return zeros, zeros
        return (wide(self.top_mean).expand(like.shape[0], *self.top_shape),
                wide(self.top_log_std).expand(like.shape[0], *self.top_shape))

    # -- density ---------------------------------------------------------------------------
    def forward(self, y: torch.Tensor | None = None, *, image: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """log p(y) in nats per sample (a density on [0, 1]^D) and the latents [z_1, ..., z_top].

        Variational dequantization: `image` (in [0, 1]) and the dequantizer's logistic `noise`
        in place of y give log p(y) - log q(u | image) with u drawn from the noise and
        y = dequantize(image, u), and y's latents."""
        if image is None:
            return self._log_density(y)
        if self.dequantizer is None:
            raise ValueError("Flow(image=..., noise=...) needs a variational dequantizer "
                             "(job.config.dequantization: variational); uniform: call Flow(y)")
        u, log_q = self.dequantizer(image, noise)
        log_density, latents = self._log_density(dequantize(image, u, self.dequantizer.num_levels))
        return log_density - log_q, latents

    def _log_density(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with fp32(y):
            x, total = self._to_flow(wide(y))
        latents = []
        for level in self.levels:
            for layer in level.layers:
                x, logdet = layer(x)
                total = total + logdet
            if level.split is not None:
                x, z, log_prob = level.split(x)
                total = total + log_prob
                latents.append(z)
        mean, log_std = self._top(x)
        with fp32(x):
            total = total + gaussian_log_prob(wide(x), mean, log_std)
        latents.append(x)
        return total, latents

    # -- the way back --------------------------------------------------------------------------
    def _up(self, top: torch.Tensor, latents: list[torch.Tensor] | None, temperature: float, generator):
        x = top
        factored = iter(reversed(latents[:-1])) if latents is not None else None
        for level in reversed(self.levels):
            if level.split is not None:
                if factored is not None:
                    z = wide(next(factored))
                else:
                    z = level.split.draw(x, temperature, generator)
                x = torch.cat([x, z], 1)
            for layer in reversed(level.layers):
                x = layer.inverse(x)
        return self._from_flow(x)

    @torch.no_grad()
    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """The y in [0, 1]^D (unclamped) whose latents these are: the exact inverse of forward."""
        return self._up(wide(latents[-1]), latents, 1.0, None)

    @torch.no_grad()
    def sample(self, n: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
        """y drawn with every prior's std scaled by `temperature` (0: the prior means all the
        way down, the mode path), unclamped."""
        device = next(self.parameters()).device
        like = torch.zeros(n, 1, device=device)
        mean, log_std = self._top(like)
        noise = torch.randn(mean.shape, generator=generator).to(device)
        return self._up(mean + temperature * log_std.exp() * noise, None, temperature, generator)
