"""Strategies: how networks are sharded and at what precision (spec section `strategy`).

    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), device)

A strategy gets its own section and the few training settings it acts on (StepSettings),
never the whole spec.
"""

from __future__ import annotations

import torch

from gentrain.spec import StrategySection
from gentrain.strategies.base import StepSettings, Strategy

__all__ = ["StepSettings", "Strategy", "make_strategy"]


def make_strategy(section: StrategySection, settings: StepSettings, device: torch.device) -> Strategy:
    name = section.name
    if name == "ddp":
        from gentrain.strategies.ddp import DDPStrategy

        return DDPStrategy(section, settings, device)
    if name == "deepspeed":
        from gentrain.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(section, settings, device)
    if name == "accelerate":
        from gentrain.strategies.accelerate import AccelerateStrategy

        return AccelerateStrategy(section, settings, device)
    if name == "fsdp":
        from gentrain.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(section, settings, device)
    raise ValueError(f"strategy.name: {name!r} is not one of ddp, deepspeed, accelerate, fsdp")
