"""GAN networks: DCGAN convolutional pairs for images and an MLP pair for 2-D toy data.

DCGAN (Radford et al. 2016): the generator projects z to a small feature map and doubles
the side with 4x4 stride-2 transposed convolutions (batch norm + ReLU, tanh output); the
discriminator halves it with 4x4 stride-2 convolutions (LeakyReLU 0.2, no norm on the
first layer) and ends in one linear score. `channels` lists widths from the image side
down (the discriminator's order); the generator uses them reversed, so the side must be
divisible by 2 ** len(channels) (8x8 digits: up to 3 levels; 28x28: 2; 32x32 and 64x64: more).

Discriminator normalisation (`d_norm`):
  batch    - DCGAN's choice
  spectral - SNGAN (Miyato et al. 2018): every conv/linear weight divided by its largest
             singular value, estimated by one power iteration per training forward
  none     - WGAN-GP's critic (batch norm would make the per-sample gradient penalty
             depend on the rest of the batch)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from gentrain.initialise import whole_parameters


def _wrap(layer: nn.Module, d_norm: str) -> nn.Module:
    if d_norm != "spectral":
        return layer
    # Spectral norm's power iteration needs the whole weight: gathered if built sharded (ZeRO-3).
    with whole_parameters(layer.parameters()):
        return spectral_norm(layer)


def check_side(shape: tuple[int, ...], channels: list[int]) -> None:
    factor = 2 ** len(channels)
    _, height, width = shape
    if height % factor or width % factor:
        raise ValueError(f"job.config.channels: {len(channels)} resolution levels need an image "
                         f"side divisible by {factor}, got {height}x{width}; use fewer entries")


class DCGANGenerator(nn.Module):
    def __init__(self, shape: tuple[int, int, int], latent_dim: int, channels: list[int]):
        super().__init__()
        check_side(shape, channels)
        out_channels, height, width = shape
        factor = 2 ** len(channels)
        self.latent_dim = latent_dim
        self.bottom = (channels[-1], height // factor, width // factor)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, math.prod(self.bottom), bias=False),
            nn.BatchNorm1d(math.prod(self.bottom)), nn.ReLU())
        widths = list(reversed(channels))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]."""
        return self.upsample(self.project(z).view(-1, *self.bottom))


class DCGANDiscriminator(nn.Module):
    def __init__(self, shape: tuple[int, int, int], channels: list[int], d_norm: str):
        super().__init__()
        check_side(shape, channels)
        in_channels, height, width = shape
        factor = 2 ** len(channels)
        widths = [in_channels] + list(channels)
        layers: list[nn.Module] = []
        for level, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(_wrap(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), d_norm))
            if d_norm == "batch" and level > 0:  # DCGAN: no norm on the input layer
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        self.score = _wrap(nn.Linear(channels[-1] * (height // factor) * (width // factor), 1), d_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One raw score (logit) per sample, shape [N]."""
        return self.score(self.features(x).flatten(1)).squeeze(1)


class MLPGenerator(nn.Module):
    """For vector data such as the 2-D mixture-of-Gaussians benchmarks."""

    def __init__(self, dim: int, latent_dim: int, hidden: int, depth: int):
        super().__init__()
        self.latent_dim = latent_dim
        widths = [latent_dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers += [nn.Linear(widths[-1], dim), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int, d_norm: str):
        super().__init__()
        widths = [dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers.append(_wrap(nn.Linear(w_in, w_out), d_norm))
            if d_norm == "batch":
                layers.append(nn.BatchNorm1d(w_out))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(_wrap(nn.Linear(widths[-1], 1), d_norm))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) weights; batch-norm scales N(1, 0.02)."""
    for layer in module.modules():
        if hasattr(layer, "parametrizations"):
            # Spectral-normed layers keep torch's default init (as SNGAN): re-drawing the
            # weight would leave the power iteration's vectors pointing at the old one.
            continue
        with whole_parameters(layer.parameters(recurse=False)):  # one layer at a time if sharded
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(layer.weight, 0.0, 0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.normal_(layer.weight, 1.0, 0.02)
                nn.init.zeros_(layer.bias)
