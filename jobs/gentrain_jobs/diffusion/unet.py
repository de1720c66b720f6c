"""The denoising networks: Ho et al.'s UNet for images and a residual MLP for vectors.

Both take (x_t, t, labels) and return a tensor shaped like x_t (the chosen target:
eps, x0 or v). Class conditioning adds a label embedding to the time embedding; the
extra last row of the table is the "no label" of classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gentrain.initialise import whole_parameters


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoids of the timestep index [B] -> [B, dim] (sin half, then cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups where the width allows


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.embed = nn.Linear(embed_dim, out_channels)
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.embed(F.silu(embedding))[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"job.config.attention_heads: {heads} does not divide the {channels} channels at an "
                             "attention resolution; pick a divisor")
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attended = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, embedding=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, embedding=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Module):
    """A residual block and its optional attention: the unit gradient checkpointing recomputes."""

    def __init__(self, block: nn.Module, attention: nn.Module | None):
        super().__init__()
        self.block, self.attention = block, attention

    def forward(self, x, embedding):
        x = self.block(x, embedding)
        return self.attention(x) if self.attention is not None else x


class Conditioning(nn.Module):
    """Time (and label) embedding: sinusoids -> MLP, plus a label table with a null row."""

    def __init__(self, base: int, embed_dim: int, num_classes: int):
        super().__init__()
        self.base, self.num_classes = base, num_classes
        self.time = nn.Sequential(nn.Linear(base, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.labels = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        embedding = self.time(timestep_embedding(t, self.base))
        if self.labels is not None:
            if labels is None:  # unconditional: the null label
                labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            embedding = embedding + self.labels(labels)
        return embedding


class UNet(nn.Module):
    def __init__(self, shape: tuple[int, int, int], channels: int = 128, channel_mult=(1, 2, 2, 2),
                 res_blocks: int = 2, attention_resolutions=(16,), attention_heads: int = 1,
                 dropout: float = 0.1, num_classes: int = 0):
        super().__init__()
        in_channels, size, _ = shape
        if size % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"job.config.channel_mult: {len(channel_mult)} levels halve the {size}-pixel image "
                             f"{len(channel_mult) - 1} times, which it does not divide; use fewer levels")
        self.shape, self.num_classes = tuple(shape), num_classes
        embed_dim = 4 * channels
        self.conditioning = Conditioning(channels, embed_dim, num_classes)
        self.grad_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def stage(cin, cout, resolution):
            attention = Attention(cout, attention_heads) if resolution in attention_resolutions else None
            return Stage(ResBlock(cin, cout, embed_dim, dropout), attention)

        self.down = nn.ModuleList()
        skips, width, resolution = [channels], channels, size
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks):
                self.down.append(stage(width, channels * mult, resolution))
                width = channels * mult
                skips.append(width)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(width))
                skips.append(width)
                resolution //= 2
        self.middle = nn.ModuleList([Stage(ResBlock(width, width, embed_dim, dropout), Attention(width, attention_heads)),
                                     Stage(ResBlock(width, width, embed_dim, dropout), None)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(res_blocks + 1):
                self.up.append(stage(width + skips.pop(), channels * mult, resolution))
                width = channels * mult
            if level > 0:
                self.up.append(Upsample(width))
                resolution *= 2
        self.out = nn.Sequential(norm(width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1))
        with whole_parameters(self.out[-1].parameters()):  # also when built sharded (ZeRO-3)
            nn.init.zeros_(self.out[-1].weight)  # start as a constant predictor: a calm first step
            nn.init.zeros_(self.out[-1].bias)

    def enable_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def _run(self, layer, x, embedding):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and isinstance(layer, Stage):
            return checkpoint(layer, x, embedding, use_reentrant=False)
        return layer(x, embedding)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.conditioning(t, labels)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, embedding)
            skips.append(h)
        for layer in self.middle:
            h = self._run(layer, h, embedding)
        for layer in self.up:
            if isinstance(layer, Stage):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, embedding)
        return self.out(h)


class ResidualMLP(nn.Module):
    """The denoiser for vector data [B, D]: residual SiLU blocks conditioned like the UNet."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, num_classes: int = 0):
        super().__init__()
        self.shape, self.num_classes = (dim,), num_classes
        self.conditioning = Conditioning(width, width, num_classes)
        self.grad_checkpointing = False
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
                                     for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def enable_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.conditioning(t, labels)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + embedding)
        return self.out(h)
