"""Convolutional VAE networks: an encoder to a diagonal Gaussian and a decoder back.

Each downsampling halves the image side, so the side must be divisible by
2 ** len(channels) (8x8 digits: two levels; 28x28 MNIST: two; 32x32: up to five).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class VAEOutput(NamedTuple):
    decoded: torch.Tensor  # Bernoulli logits, or Gaussian / logistic means
    mean: torch.Tensor
    log_var: torch.Tensor
    # Gaussian: one shared log-std; logistic: per-pixel log-scales; Bernoulli: None.
    log_scale: torch.Tensor | None


class _Blocks(nn.Module):
    """A stack of blocks that can trade compute for memory (gradient checkpointing)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ConvVAE(nn.Module):
    def __init__(self, shape: tuple[int, int, int], latent_dim: int, channels: list[int],
                 likelihood: str):
        super().__init__()
        in_channels, height, width = shape
        factor = 2 ** len(channels)
        if height % factor or width % factor:
            raise ValueError(f"job.config.channels: {len(channels)} downsampling levels need an "
                             f"image side divisible by {factor}, got {height}x{width}; "
                             "use fewer channels entries")
        self.shape = tuple(shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.bottom = (channels[-1], height // factor, width // factor)
        widths = [in_channels] + list(channels)
        self.encoder = _Blocks([
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU())
            for c_in, c_out in zip(widths[:-1], widths[1:])
        ])
        flat = channels[-1] * self.bottom[1] * self.bottom[2]
        self.to_posterior = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        up = list(reversed(widths[1:]))
        self.decoder = _Blocks([
            nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            for c_in, c_out in zip(up, up[1:] + [up[-1]])
        ])
        # The logistic decoder predicts a log-scale per pixel beside each mean.
        out_channels = 2 * in_channels if likelihood == "logistic" else in_channels
        self.to_pixels = nn.Sequential(nn.SiLU(), nn.Conv2d(up[-1], out_channels, 3, padding=1))
        # Gaussian decoder: one learned log-std shared by all pixels. Shape (1,), not 0-dim:
        # DeepSpeed's broadcasts and clipping only take parameters with a dimension.
        self.log_scale = nn.Parameter(torch.zeros(1)) if likelihood == "gaussian" else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_scale"  # checkpoints before the (1,) shape hold a 0-dim log_scale
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def enable_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        mean, log_var = self.to_posterior(h).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output: Bernoulli logits, or Gaussian / logistic means."""
        return self.decode_params(z)[0]

    def decode_params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits or means, log-scale or None): everything log_likelihood needs."""
        h = self.from_latent(z).view(-1, *self.bottom)
        out = self.to_pixels(self.decoder(h))
        if self.likelihood == "logistic":
            means, log_scales = out.chunk(2, dim=1)
            # PixelCNN++'s floor: a bin is 1/255 wide, so narrower scales only overfit.
            return means, log_scales.clamp_min(-7.0)
        # `* 1.0`: a fresh tensor, not the parameter itself (ZeRO-3's parameter tracing
        # refuses a module that returns one of its own parameters).
        return out, (self.log_scale * 1.0 if self.log_scale is not None else None)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
        """Reparameterised pass; `noise` (standard normal, [N, latent]) may be given."""
        mean, log_var = self.encode(x)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * log_var) * noise
        decoded, log_scale = self.decode_params(z)
        return VAEOutput(decoded, mean, log_var, log_scale)
