"""StepContext: everything a job type's `train_step(ctx, batch)` may touch.

    def train_step(ctx, batch):
        with ctx.autocast():
            loss = objective(ctx.module("vae"), batch["image"], kl_weight=...(ctx.global_step))
        ctx.backward(loss, "vae")
        return {"loss": float(loss), **ctx.step("vae")}

A GAN steps two networks in its own order and freezes the critic while the generator
learns through it:

    with ctx.frozen("discriminator") as critic:
        loss = generator_loss(critic(ctx.module("generator")(z)))
        ctx.backward(loss, "generator")
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from gentrain.nonfinite import NonFiniteError, NonFiniteFound, NonFiniteRollback, stop_message


class StepContext:
    def __init__(self, strategy, config, total_steps: int):
        self.strategy = strategy
        self.config = config  # the job type's config dataclass
        self.total_steps = total_steps
        self.global_step = 0  # optimizer steps done before this one

    def module(self, name: str) -> torch.nn.Module:
        """The network to call forward on (wrapped by the strategy)."""
        return self.strategy.module(name)

    def plain(self, name: str) -> torch.nn.Module:
        """The unwrapped network (same parameters): for extra forward/backward passes an
        engine would refuse, e.g. a gradient penalty's double backward."""
        return self.strategy.unwrap(name)

    def autocast(self):
        return self.strategy.autocast()

    def backward(self, loss: torch.Tensor, name: str) -> None:
        # Judged before the update (step); under DDP a bad loss also poisons one gradient.
        guarded = self.strategy.nonfinite.record_loss(name, loss, lambda: self.strategy.unwrap(name).named_parameters())
        self.strategy.backward(guarded, name)

    def step(self, name: str) -> dict[str, float]:
        """Clip, optimizer and lr step for `name` (at the accumulation boundary), unless its
        loss or gradients are not finite: then train.nonfinite decides (gentrain.nonfinite);
        under rollback NonFiniteRollback reaches the engine, which restores a checkpoint."""
        try:
            stepped = self.strategy.step(name)
        except NonFiniteFound as found:
            if self.strategy.settings.nonfinite == "rollback":
                raise NonFiniteRollback(found.finding, self.global_step) from None  # Engine.fit
            message = stop_message(found.finding, self.global_step, self.strategy.nonfinite_facts(name))
            raise NonFiniteError(message) from None
        return {f"{key}/{name}": value for key, value in stepped.items()}

    def ema_update(self, name: str, decay: float) -> None:
        """Keep EMA weights of `name` (used for samples and evaluation); call after step."""
        if self.strategy.at_boundary:
            self.strategy.ema.update(name, decay)

    def frozen(self, name: str) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """`name`'s parameters get no gradients inside (a critic while its generator learns);
        yields the network to call, and the backward through it belongs inside the block."""
        return self.strategy.frozen(name)
