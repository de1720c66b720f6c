"""Invertible layers of RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

Every layer maps x [B, C, H, W] to (y, log|det dy/dx| [B]) in `forward` and back in
`inverse`. The flow's arithmetic runs in fp32 whatever the precision of the run: the
coupling networks (convolutions) may run under autocast, but their outputs are cast to
fp32 before they scale or shift anything, the 1x1 convolution and every log-determinant
are computed with autocast off, so bf16 rounding reaches only what the networks predict,
never the change-of-variables terms.

Under ZeRO-3 a network's parameters are gathered by hooks on its own `forward`: training
calls only `forward` (through `__call__`) on every layer; `inverse` runs in evaluation
and sampling, where the platform hands over hook-free networks with full weights.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gentrain.initialise import whole_parameters


def fp32(x: torch.Tensor):
    """No autocast inside (the flow's own arithmetic)."""
    return torch.autocast(x.device.type, enabled=False)


def wide(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 to fp32; fp32 and fp64 (the Jacobian tests) as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: each 2x2 patch becomes 4 channels (a permutation)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class Squeeze(nn.Module):
    """Space to depth: a permutation of the entries, so its log-determinant is 0."""

    def forward(self, x):
        return squeeze2d(x), wide(x).new_zeros(x.shape[0])

    def inverse(self, y):
        return unsqueeze2d(y)


# -- ActNorm --------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the default process group (the tensor itself when alone)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def pooled_moments(x: torch.Tensor, reduce=all_reduce_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of x [B, C, H, W] over the batches of every rank together.

    Count, sum and sum of squares (float64) are summed across ranks, so every rank gets the
    same numbers: the moments of the union of the ranks' first batches.
    """
    flat = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    stats = torch.cat([flat.new_tensor([flat.shape[1]]), flat.sum(1), flat.pow(2).sum(1)])
    stats = reduce(stats)
    count, sums, squares = stats[0], stats[1:1 + x.shape[1]], stats[1 + x.shape[1]:]
    mean = sums / count
    var = (squares / count - mean.pow(2)).clamp_min(0.0)
    return mean, var.sqrt()


class ActNorm(nn.Module):
    """y = (x + bias) * exp(log_scale) per channel (Glow, sec. 3.1).

    Data-dependent initialisation: on the first training forward the per-channel moments of
    the batch, pooled over every rank (`pooled_moments`), set bias = -mean and
    log_scale = -log std, so that batch leaves with zero mean and unit variance per channel.

    They are kept as buffers (`init_bias`, `init_log_scale`) beside learned parameters that
    start at 0: y = (x + init_bias + bias) * exp(init_log_scale + log_scale). The same
    function and the same gradients as writing the statistics into the parameters, but no
    parameter is ever written outside the optimizer, so DDP replicas, DeepSpeed's fp32
    master copies and ZeRO-3 partitions never disagree with the module. Buffers travel in
    every checkpoint with `initialized`: a resumed run never initialises again.
    In evaluation mode an uninitialised ActNorm is the identity (evaluation at step 0).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("init_bias", torch.zeros(1, channels, 1, 1))
        self.register_buffer("init_log_scale", torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._known_initialized = False  # saves a device sync per forward once true

    def is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, reduce=all_reduce_sum) -> None:
        mean, std = pooled_moments(x, reduce)
        self.init_bias.copy_((-mean).view_as(self.init_bias))
        self.init_log_scale.copy_((-torch.log(std + self.eps)).view_as(self.init_log_scale))
        self.initialized.fill_(1)
        self._known_initialized = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # read the loaded flag again

    def _terms(self):
        bias = wide(self.init_bias) + wide(self.bias)
        log_scale = wide(self.init_log_scale) + wide(self.log_scale)
        return bias, log_scale

    def forward(self, x):
        if self.training and not self.is_initialized():
            self.initialize(x)
        with fp32(x):
            bias, log_scale = self._terms()
            y = (wide(x) + bias) * log_scale.exp()
            logdet = (log_scale.sum() * x.shape[2] * x.shape[3]).expand(x.shape[0])
        return y, logdet

    def inverse(self, y):
        with fp32(y):
            bias, log_scale = self._terms()
            return wide(y) * (-log_scale).exp() - bias


# -- invertible 1x1 convolution ------------------------------------------------------------------
class InvConv1x1(nn.Module):
    """A learned channel mixing y = W x at every position (Glow, sec. 3.2), W initialised as a
    random rotation. log|det| = H W log|det W|.

    lu=True: W = P L (U + diag(sign_s * exp(log_s))) with P fixed, L unit lower triangular,
    U strictly upper triangular (Glow's LU parametrisation): the log-determinant is
    H W sum(log_s), O(C) instead of O(C^3).
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu:
            self.weight = nn.Parameter(rotation)
            return
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def weight_and_logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W and log|det W| in fp32 (autocast off; called inside `fp32`)."""
        if not self.lu:
            weight = wide(self.weight)
            return weight, torch.linalg.slogdet(weight)[1]
        lower = wide(self.lower) * self.lower_mask + self.eye
        upper = wide(self.upper) * self.lower_mask.T + torch.diag(self.sign_s * wide(self.log_s).exp())
        return self.permutation.to(lower.dtype) @ lower @ upper, wide(self.log_s).sum()

    def forward(self, x):
        with fp32(x):
            weight, logdet = self.weight_and_logdet()
            y = F.conv2d(wide(x), weight[:, :, None, None])
        return y, (logdet * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, y):
        with fp32(y):
            weight, _ = self.weight_and_logdet()
            inverse = torch.linalg.inv(weight.double()).to(weight.dtype)
            return F.conv2d(wide(y), inverse[:, :, None, None])


# -- affine coupling ---------------------------------------------------------------------------
class ZeroConv(nn.Module):
    """A 3x3 convolution starting at zero, with a learned per-channel gain exp(3 * logs)
    (Glow's Conv2dZeros): coupling layers and learned priors start as the identity / N(0, I)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        with whole_parameters(self.conv.parameters()):  # also when built sharded (ZeRO-3)
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, channels_out, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(3.0 * self.logs)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def coupling_net(kind: str, channels_in: int, channels_out: int, hidden: int, blocks: int) -> nn.Module:
    """The network predicting (log-scale, shift): RealNVP's ResNet (`blocks` residual blocks
    of 3x3 convolutions) or Glow's 3x3 -> 1x1 -> 3x3 CNN; both end in a zero convolution,
    so every coupling starts at (or near, for the sigmoid scale) the identity."""
    if kind == "resnet":
        layers = [nn.Conv2d(channels_in, hidden, 3, padding=1)]
        layers += [ResidualBlock(hidden) for _ in range(blocks)]
        layers += [nn.ReLU(), ZeroConv(hidden, channels_out)]
    else:
        layers = [nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(hidden, hidden, 1), nn.ReLU(), ZeroConv(hidden, channels_out)]
    return nn.Sequential(*layers)


def checkerboard(height: int, width: int, parity: int) -> torch.Tensor:
    """1 where (i + j) % 2 == parity: the entries that condition, [1, 1, H, W]."""
    i = torch.arange(height)[:, None]
    j = torch.arange(width)[None, :]
    return ((i + j) % 2 == parity).float()[None, None]


class AffineCoupling(nn.Module):
    """y_a = x_a; y_b = x_b * exp(log_s(x_a)) + t(x_a) (Dinh et al. 2017, eq. 7).

    mask "checkerboard": a and b are the two colours of a spatial checkerboard (`parity`
    chooses which conditions); the network sees x * mask. mask "channel": a and b are the
    two halves of the channels (`parity` 1 swaps them).
    scale "tanh": log_s = w * tanh(h) with a learned per-channel w (RealNVP);
    "sigmoid": s = sigmoid(h + 2) (Glow's code), so log_s < 0 and starts near -0.13.
    Glow writes y_b = (x_b + t) * s: the same family of maps with t reparametrised.
    log|det| = sum of log_s over the b entries.
    """

    def __init__(self, channels: int, size: tuple[int, int], mask: str, parity: int, scale: str,
                 net: str, hidden: int, blocks: int):
        super().__init__()
        self.mask_kind, self.parity, self.scale = mask, parity, scale
        if mask == "checkerboard":
            self.register_buffer("mask", checkerboard(*size, parity))
            condition, transformed = channels, channels
        else:
            self.half = channels // 2
            condition = self.half if parity == 0 else channels - self.half
            transformed = channels - condition
        self.net = coupling_net(net, condition, 2 * transformed, hidden, blocks)
        if scale == "tanh":
            self.tanh_gain = nn.Parameter(torch.ones(1, transformed, 1, 1))

    def _split(self, x):
        if self.parity == 0:
            return x[:, :self.half], x[:, self.half:]
        return x[:, self.half:], x[:, :self.half]

    def _join(self, a, b):
        return torch.cat([a, b], 1) if self.parity == 0 else torch.cat([b, a], 1)

    def _log_scale_shift(self, condition):
        h = wide(self.net(condition))  # the network may run under autocast; the rest is fp32
        raw, shift = h[:, 0::2], h[:, 1::2]
        if self.scale == "tanh":
            log_s = wide(self.tanh_gain) * torch.tanh(raw)
        else:
            log_s = F.logsigmoid(raw + 2.0)
        return log_s, shift

    def forward(self, x):
        x = wide(x)
        if self.mask_kind == "checkerboard":
            mask = self.mask
            log_s, shift = self._log_scale_shift(x * mask)
            with fp32(x):
                log_s, shift = log_s * (1 - mask), shift * (1 - mask)
                y = x * mask + (1 - mask) * (x * log_s.exp() + shift)
            return y, log_s.flatten(1).sum(1)
        a, b = self._split(x)
        log_s, shift = self._log_scale_shift(a)
        with fp32(x):
            y = self._join(a, b * log_s.exp() + shift)
        return y, log_s.flatten(1).sum(1)

    def inverse(self, y):
        y = wide(y)
        if self.mask_kind == "checkerboard":
            mask = self.mask
            log_s, shift = self._log_scale_shift(y * mask)
            with fp32(y):
                return y * mask + (1 - mask) * ((y - shift) * (-log_s).exp())
        a, b = self._split(y)
        log_s, shift = self._log_scale_shift(a)
        with fp32(y):
            return self._join(a, (b - shift) * (-log_s).exp())


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """sum over entries of log N(z; mean, exp(log_std)^2), one value per sample."""
    per_entry = -0.5 * math.log(2 * math.pi) - log_std - 0.5 * ((z - mean) * torch.exp(-log_std)).pow(2)
    return per_entry.flatten(1).sum(1)
