"""Ancestral sampling, pixel by pixel and sub-pixel by sub-pixel, and inpainting.

What is cached: the class embedding of every layer once per call; the vertical stack
once per image row (it sees only finished rows, so its hand-over to the horizontal stack
is fixed for the whole row); per sub-pixel only the horizontal stack and the head run,
on that one row (their convolutions are 1 x k and 1 x 1, so one row is exact). A step
costs O(W) instead of O(H W), and the vertical stack runs H times instead of H W C.
Nothing is cached across rows (the vertical stack reruns on the finished rows), which
keeps the code to the network's own layers.

All randomness comes from the request's CPU generator (Gumbel noise for categorical
choices, uniforms for the Bernoulli and logistic draws), moved to the network's device.
"""

from __future__ import annotations

import torch

from gentrain_jobs.pixelcnn.likelihoods import (LEVELS, MIN_LOG_SCALE, colour_pairs, network_input,
                                                num_levels)

_TINY = 1e-7  # keeps uniforms off 0 and 1, where the logs below are infinite


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator).clamp(_TINY, 1 - _TINY).to(device)


def _gumbel(shape, generator: torch.Generator, device) -> torch.Tensor:
    return -torch.log(-torch.log(_uniform(shape, generator, device)))


def _sub_pixel(head: str, out: torch.Tensor, channel: int, channels: int, generator, temperature):
    """One channel's value from the head's output at one pixel, out [n, out_channels]."""
    if head == "softmax":
        logits = out.float().view(len(out), LEVELS, channels)[:, :, channel] / temperature
        return (logits + _gumbel(logits.shape, generator, out.device)).argmax(dim=1)
    probability = torch.sigmoid(out[:, channel].float() / temperature)
    return (_uniform(probability.shape, generator, out.device) < probability).long()


def _mixture_pixel(out: torch.Tensor, channels: int, mixtures: int, generator, temperature):
    """All channels of one pixel [n, C]: a component, then R, G | R, B | R, G from it."""
    n = len(out)
    out = out.float()
    logits = out[:, :mixtures] / temperature
    rest = out[:, mixtures:].view(n, mixtures, -1)
    chosen = (logits + _gumbel(logits.shape, generator, out.device)).argmax(dim=1)
    params = rest[torch.arange(n, device=out.device), chosen]  # [n, 2C + C(C-1)/2]
    means, log_scales = params[:, :channels], params[:, channels:2 * channels].clamp_min(MIN_LOG_SCALE)
    coefficients = torch.tanh(params[:, 2 * channels:])
    uniforms = _uniform((n, channels), generator, out.device)
    values, levels = [], []
    for c in range(channels):
        mean = means[:, c]
        for earlier, pair in colour_pairs(c):
            mean = mean + coefficients[:, pair] * values[earlier]
        u = uniforms[:, c]
        x = mean + temperature * log_scales[:, c].exp() * (torch.log(u) - torch.log1p(-u))
        # The nearest level; beyond the end bins' centres the edge bins take all (as in the likelihood).
        level = torch.round((x.clamp(-1, 1) + 1) * (LEVELS - 1) / 2).long()
        levels.append(level)
        values.append(network_input(level, LEVELS))
    return torch.stack(levels, dim=1)


@torch.no_grad()
def ancestral(model, head: str, levels: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
              *, mixtures: int, temperature: float = 1.0, first_row: int = 0) -> torch.Tensor:
    """Fill rows first_row.. of `levels` [n, C, H, W] (int64 on the network's device; rows
    above first_row are given, e.g. the top of an image to complete) in raster order."""
    levels = levels.clone()
    _, channels, height, width = levels.shape
    count = num_levels(head)
    conds = model.conditions(labels)
    x = network_input(levels, count)
    for row in range(first_row, height):
        contexts = model.row_context(x[:, :, :row], conds)
        for column in range(width):
            if head == "logistic_mixture":
                out = model.horizontal_row(x[:, :, row:row + 1], contexts, conds)[:, :, 0, column]
                levels[:, :, row, column] = _mixture_pixel(out, channels, mixtures, generator, temperature)
            else:
                for channel in range(channels):
                    out = model.horizontal_row(x[:, :, row:row + 1], contexts, conds)[:, :, 0, column]
                    levels[:, channel, row, column] = _sub_pixel(head, out, channel, channels, generator,
                                                                 temperature)
                    x[:, channel, row, column] = network_input(levels[:, channel, row, column], count)
            x[:, :, row, column] = network_input(levels[:, :, row, column], count)
    return levels


def network_evaluations(head: str, shape: tuple[int, int, int], first_row: int = 0) -> dict[str, int]:
    """How often each stack runs for one ancestral pass (the cache's effect, for the log line)."""
    channels, height, width = shape
    rows = height - first_row
    steps = rows * width * (1 if head == "logistic_mixture" else channels)
    return {"vertical": rows, "horizontal_row": steps}
