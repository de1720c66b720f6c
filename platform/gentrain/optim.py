"""Optimizers and learning-rate schedules from the spec's `train.optimizer` and
`train.schedule`: the same torch objects under every strategy.

    optimizer = make_optimizer(model.parameters(), spec.train.optimizer)
    scheduler = make_scheduler(optimizer, spec.train.steps, spec.train.schedule)

The engine builds the optimizers (a job type may set per-network lr and betas); a strategy
receives them already built, and a scheduler factory in its StepSettings.
"""

from __future__ import annotations

import math

import torch

from gentrain.spec import OptimizerSection, ScheduleSection


def make_optimizer(params, section: OptimizerSection) -> torch.optim.Optimizer:
    if section.name == "adamw":
        return torch.optim.AdamW(params, lr=section.lr, betas=tuple(section.betas),
                                 weight_decay=section.weight_decay)
    if section.name == "adam":
        return torch.optim.Adam(params, lr=section.lr, betas=tuple(section.betas),
                                weight_decay=section.weight_decay)
    return torch.optim.SGD(params, lr=section.lr, momentum=section.momentum,
                           weight_decay=section.weight_decay)


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleSection) -> float:
    """Pure function: the factor on the base lr at optimizer step `step` (0-based)."""
    warmup = schedule.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = schedule.min_lr_ratio
    if schedule.name == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   schedule: ScheduleSection) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, schedule))
