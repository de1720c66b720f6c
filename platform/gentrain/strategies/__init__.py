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
    # Validation refuses these until a job type lists them in `supports`.
    raise NotImplementedError(f"strategy.name: {name!r} is not available yet; use 'ddp'")
