"""EMA: exponential moving averages of networks' weights, for samples and evaluation.

    ema = EMA(strategy.full_weights)        # every strategy holds one: strategy.ema
    ema.update("generator", decay=0.999)    # after the optimizer step (ctx.ema_update)
    ema.get("generator")                     # the averaged copy, or None before the first update

ema <- decay * ema + (1 - decay) * weights, kept in fp32 beside the trained network. The
first update copies the weights. `full_weights(name)` is a context manager yielding the
plain network with every weight readable inside (ZeRO-3 gathers its shards there), and
`copy(module)` makes the averaged copy: a plain deepcopy by default, a hook-free one under
DeepSpeed. The state (one state_dict per network) resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
from typing import Callable

import torch
from torch import nn

FullWeights = Callable[[str], contextlib.AbstractContextManager[nn.Module]]


def fp32_deepcopy(module: nn.Module) -> nn.Module:
    return copy_module.deepcopy(module).float().eval().requires_grad_(False)


class EMA:
    def __init__(self, full_weights: FullWeights, copy: Callable[[nn.Module], nn.Module] = fp32_deepcopy):
        self._full_weights = full_weights
        self._copy = copy
        self._averages: dict[str, nn.Module] = {}

    @torch.no_grad()
    def update(self, name: str, decay: float) -> None:
        with self._full_weights(name) as module:
            average = self._averages.get(name)
            if average is None:
                self._averages[name] = self._copy(module)
                return
            # One foreach call per network rather than one lerp_ per tensor (a debug UNet's
            # 128 tensors: the per-call overhead was a third of its step); the same kernel.
            averages = list(average.parameters())
            if averages:
                torch._foreach_lerp_(averages, [param.detach().float() for param in module.parameters()],
                                     1.0 - decay)
            buffers = list(average.buffers())
            if buffers:
                torch._foreach_copy_(buffers, list(module.buffers()))

    def get(self, name: str) -> nn.Module | None:
        return self._averages.get(name)

    def state_dict(self) -> dict[str, dict]:
        return {name: average.state_dict() for name, average in self._averages.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, average_state in state.items():
            with self._full_weights(name) as module:
                average = self._copy(module)
            average.load_state_dict(average_state)
            self._averages[name] = average
