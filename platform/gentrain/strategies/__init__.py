"""Strategies: how networks are sharded and at what precision (spec section `strategy`)."""

from __future__ import annotations

import torch

from gentrain.spec import JobSpec
from gentrain.strategies.base import Strategy


def make_strategy(spec: JobSpec, device: torch.device) -> Strategy:
    name = spec.strategy.name
    if name == "ddp":
        from gentrain.strategies.ddp import DDPStrategy

        return DDPStrategy(spec, device)
    if name == "deepspeed":
        from gentrain.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(spec, device)
    if name == "accelerate":
        from gentrain.strategies.accelerate import AccelerateStrategy

        return AccelerateStrategy(spec, device)
    raise ValueError(f"strategy.name: {name!r} is not one of ddp, deepspeed, accelerate")
