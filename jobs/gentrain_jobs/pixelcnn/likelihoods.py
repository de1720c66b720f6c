"""The output heads: what one network output means as a distribution over pixel values.

Images arrive as floats in [0, 1] (8-bit values / 255). `to_levels` turns them into the
integers the model is a distribution over: 0..255, or 0/1 when binarized (pixels above
one half are 1). The network reads them scaled to [-1, 1] (`network_input`).

- softmax: 256 logits per sub-pixel; the output's channel k * C + c is value k of
  channel c (so it belongs to colour group c).
- logistic_mixture (PixelCNN++, Salimans et al. 2017): per pixel K mixture logits and,
  per component, a mean and log-scale per channel and the colour coefficients
  (G | R, B | R, B | G for RGB): the mean of channel c moves by coefficient x value of
  each earlier channel of the same pixel. One component is chosen per pixel.
- bernoulli: one logit per sub-pixel of binarized images.

`log_prob` gives log p(image) in nats, one per image: exact probabilities of the
discrete values, so -log_prob / (C H W ln 2) is bits/dim as published.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = 256
HEADS = ("softmax", "logistic_mixture", "bernoulli")
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on the logistic's log-scale (in [-1, 1] units)


def num_levels(head: str) -> int:
    return 2 if head == "bernoulli" else LEVELS


def to_levels(images: torch.Tensor, binarize: bool) -> torch.Tensor:
    """[0, 1] floats -> int64 values: 0..255, or 0/1 when binarized (threshold one half)."""
    if binarize:
        return (images > 0.5).long()
    return torch.round(images.float() * (LEVELS - 1)).long().clamp(0, LEVELS - 1)


def network_input(levels: torch.Tensor, count: int) -> torch.Tensor:
    """Values 0..count-1 -> [-1, 1], the network's input (and the mixture's x)."""
    return levels.float() * (2.0 / (count - 1)) - 1.0


def output_channels(head: str, channels: int, mixtures: int) -> int:
    if head == "softmax":
        return LEVELS * channels
    if head == "bernoulli":
        return channels
    return mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def network_groups(head: str, channels: int) -> int:
    """Colour groups inside the network: sub-pixels in turn, or whole pixels (mixture)."""
    return 1 if head == "logistic_mixture" else channels


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 network outputs in fp32 for the likelihood; fp32 and fp64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def softmax_logits(output: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, 256 * C, H, W] -> [B, 256, C, H, W] (value, channel)."""
    batch, _, height, width = output.shape
    return at_least_fp32(output).view(batch, LEVELS, channels, height, width)


def mixture_parameters(output: torch.Tensor, x: torch.Tensor, mixtures: int):
    """Mixture logits [B, K, H, W], means [B, K, C, H, W] moved by the colour coefficients
    times x (the pixel's earlier channels, in [-1, 1]) and log-scales [B, K, C, H, W]."""
    batch, channels, height, width = x.shape
    output = at_least_fp32(output)
    logits = output[:, :mixtures]
    rest = output[:, mixtures:].view(batch, mixtures, -1, height, width)
    means = rest[:, :, :channels]
    log_scales = rest[:, :, channels:2 * channels].clamp_min(MIN_LOG_SCALE)
    coefficients = torch.tanh(rest[:, :, 2 * channels:])
    shifted = []
    for c in range(channels):
        mean = means[:, :, c]
        for earlier, pair in colour_pairs(c):
            mean = mean + coefficients[:, :, pair] * x[:, None, earlier].to(mean.dtype)
        shifted.append(mean)
    return logits, torch.stack(shifted, dim=2), log_scales


def colour_pairs(channel: int) -> list[tuple[int, int]]:
    """(earlier channel, coefficient index) pairs that move `channel`'s mean: RGB has
    G | R (0), B | R (1), B | G (2)."""
    start = channel * (channel - 1) // 2
    return [(earlier, start + earlier) for earlier in range(channel)]


def discretized_logistic_log_prob(levels: torch.Tensor, mean: torch.Tensor,
                                  log_scale: torch.Tensor) -> torch.Tensor:
    """log P(value) of a logistic discretized to 256 bins on [-1, 1] (width 2/255 each; the
    lowest bin reaches to -inf, the highest to +inf, so the bins sum to one).

    An interior bin's mass sigmoid(u) - sigmoid(l) is computed as
    sigmoid(u) (1 - sigmoid(l)) (1 - exp(l - u)): exact algebra, stable in both tails,
    so no density-at-the-centre approximation is needed for tiny bins.
    """
    x = levels.to(mean.dtype) * (2.0 / (LEVELS - 1)) - 1.0  # in the parameters' precision
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + 1.0 / (LEVELS - 1))
    lower = inv_scale * (x - mean - 1.0 / (LEVELS - 1))
    log_cdf_upper = F.logsigmoid(upper)
    log_survival_lower = F.logsigmoid(-lower)
    # The last factor only underflows for scales beyond 1e30: clamped so it stays finite.
    interior = log_cdf_upper + log_survival_lower + torch.log((-torch.expm1(lower - upper)).clamp_min(1e-30))
    return torch.where(levels == 0, log_cdf_upper,
                       torch.where(levels == LEVELS - 1, log_survival_lower, interior))


def mixture_log_prob(output: torch.Tensor, levels: torch.Tensor, mixtures: int) -> torch.Tensor:
    """log p(pixel) per pixel [B, H, W]: log sum_k pi_k prod_c P_k(x_c | x_<c of the pixel)."""
    x = network_input(levels, LEVELS)
    logits, means, log_scales = mixture_parameters(output, x, mixtures)
    per_channel = discretized_logistic_log_prob(levels[:, None], means, log_scales)
    return torch.logsumexp(F.log_softmax(logits, dim=1) + per_channel.sum(dim=2), dim=1)


def log_prob(head: str, output: torch.Tensor, levels: torch.Tensor, mixtures: int) -> torch.Tensor:
    """log p(image) in nats, one per image [B]; at least float32 whatever the network's precision."""
    if head == "softmax":
        logits = softmax_logits(output, levels.shape[1])
        return -F.cross_entropy(logits, levels, reduction="none").flatten(1).sum(1)
    if head == "bernoulli":
        return -F.binary_cross_entropy_with_logits(at_least_fp32(output), levels.to(at_least_fp32(output).dtype),
                                                   reduction="none").flatten(1).sum(1)
    return mixture_log_prob(output, levels, mixtures).flatten(1).sum(1)


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats per image -> bits per sub-pixel."""
    return nats / (dims * math.log(2.0))
