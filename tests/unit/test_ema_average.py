"""gentrain.ema.EMA: ema <- decay * ema + (1 - decay) * weights in fp32, the first update a
copy, buffers copied; one foreach call per network gives exactly the per-tensor formula.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_ema_average.py -q
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gentrain.ema import EMA


def test_the_average_is_the_per_tensor_lerp_exactly_and_buffers_follow():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)).to(torch.bfloat16)
    ema = EMA(lambda name: contextlib.nullcontext(net))
    ema.update("net", 0.9)  # the first update copies (in fp32)
    expected = [p.detach().float().clone() for p in net.parameters()]
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        ema.update("net", 0.9)
        for value, p in zip(expected, net.parameters()):
            value.lerp_(p.detach().float(), 1.0 - 0.9)
    average = ema.get("net")
    assert all(a.dtype == torch.float32 for a in average.parameters())
    assert all(torch.equal(a, e) for a, e in zip(average.parameters(), expected))
    assert torch.equal(average[1].running_mean, net[1].running_mean.float())
    # Not the weights themselves: the average lags behind them.
    assert not torch.equal(average[0].weight, net[0].weight.float())
