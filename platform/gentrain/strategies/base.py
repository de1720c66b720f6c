"""The strategy interface: how modules are wrapped, stepped, reduced and saved.

A job type never knows which strategy runs it. It calls, through its step context:

    with ctx.autocast():
        loss = ...(ctx.module("vae")(batch))
    ctx.backward(loss, "vae")
    ctx.step("vae")          # clip, optimizer step, lr schedule, zero grads

Gradient accumulation lives here too: the loop opens `micro_step(is_last)` around each
micro-batch; `backward` scales the loss and `step` only steps on the last micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
import math
from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch
from torch import nn

from gentrain.spec import JobSpec, OptimizerSection, ScheduleSection

# strategy.precision -> the dtype of autocast (ddp, bench) and of DeepSpeed engines; fp32: none.
LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def make_scheduler(optimizer, total_steps: int, schedule: ScheduleSection):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, schedule))


class Strategy(ABC):
    """One interface for DDP, DeepSpeed and Accelerate."""

    def __init__(self, spec: JobSpec, device: torch.device):
        self.spec = spec
        self.device = device
        self.grad_accum = spec.train.grad_accum
        self.grad_clip = spec.train.grad_clip
        self._last_micro = True

    # -- set-up -----------------------------------------------------------------
    @abstractmethod
    def setup(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Move, wrap and own the modules and their optimizers."""

    @abstractmethod
    def module(self, name: str) -> nn.Module:
        """The module to call forward on (possibly wrapped)."""

    @abstractmethod
    def unwrap(self, name: str) -> nn.Module:
        """The plain module (for sampling, evaluation and export)."""

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """Names of the trained modules."""

    # -- one step ---------------------------------------------------------------
    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes."""

    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        self._last_micro = is_last
        with self._no_sync(not is_last):
            yield

    @property
    def at_boundary(self) -> bool:
        """True in the micro-batch whose `step` really steps the optimizer."""
        return self._last_micro

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, name: str) -> None:
        """Backward for `name`'s loss (scaled for accumulation)."""

    @abstractmethod
    def step(self, name: str) -> dict[str, float]:
        """Clip, step optimizer and schedule, zero grads; returns {'grad_norm': ...}."""

    def lr(self, name: str) -> float | None:
        """The current learning rate of `name`'s optimizer (None: `name` is not trained).

        Strategies that keep torch optimizers in `self._optimizers` need not override it.
        """
        optimizer = getattr(self, "_optimizers", {}).get(name)
        return optimizer.param_groups[0]["lr"] if optimizer is not None else None

    # -- collectives ------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if not torch.distributed.is_initialized():
            return tensor
        # On the strategy's device: NCCL cannot reduce CPU tensors.
        reduced = tensor.to(self.device, copy=True)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        if op == "mean":
            reduced /= torch.distributed.get_world_size()
        return reduced.to(tensor.device)

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    @contextlib.contextmanager
    def frozen(self, name: str) -> Iterator[nn.Module]:
        """`name` without gradients for its parameters, to backpropagate through (a GAN's
        critic while the generator learns). Yields the plain network: a frozen network needs
        no wrapper, and going around it keeps DDP's reducer and DeepSpeed's ZeRO hooks out of
        another network's backward. Under ZeRO-3 its full weights stay gathered inside, so
        the backward through it belongs inside the block."""
        module = self.unwrap(name)
        params = list(module.parameters())
        previous = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with self.gathered(name):
                yield module
        finally:
            for p, flag in zip(params, previous):
                p.requires_grad_(flag)

    # -- EMA weights and evaluation ---------------------------------------------------
    def gathered(self, name: str) -> contextlib.AbstractContextManager:
        """Full parameters of `name` readable inside (ZeRO-3 overrides this to gather)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def ema_update(self, name: str, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, kept in fp32 beside the network."""
        if not hasattr(self, "_ema"):
            self._ema: dict[str, nn.Module] = {}
        with self.gathered(name):
            module = self.unwrap(name)
            if name not in self._ema:
                self._ema[name] = copy.deepcopy(module).float().eval().requires_grad_(False)
                return
            ema = self._ema[name]
            for ema_param, param in zip(ema.parameters(), module.parameters()):
                ema_param.lerp_(param.detach().float(), 1.0 - decay)
            for ema_buffer, buffer in zip(ema.buffers(), module.buffers()):
                ema_buffer.copy_(buffer)

    def ema(self, name: str) -> nn.Module | None:
        return getattr(self, "_ema", {}).get(name)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[dict[str, nn.Module]]:
        """Modules for sampling and evaluation: EMA weights where kept, in eval mode."""
        with contextlib.ExitStack() as stack:
            modules = {}
            for name in self.names:
                stack.enter_context(self.gathered(name))
                modules[name] = self.ema(name) or self.unwrap(name)
            was_training = {name: m.training for name, m in modules.items()}
            for module in modules.values():
                module.eval()
            try:
                yield modules
            finally:
                for name, module in modules.items():
                    module.train(was_training[name])

    def ema_state(self) -> dict[str, dict]:
        return {name: module.state_dict() for name, module in getattr(self, "_ema", {}).items()}

    def load_ema_state(self, state: dict[str, dict]) -> None:
        for name, ema_state in state.items():
            with self.gathered(name):
                self._ema = getattr(self, "_ema", {})
                self._ema[name] = copy.deepcopy(self.unwrap(name)).float().eval().requires_grad_(False)
            self._ema[name].load_state_dict(ema_state)

    # -- checkpoints ------------------------------------------------------------
    @abstractmethod
    def save(self, directory: str, rank: int) -> None:
        """Write this rank's share of the training state into `directory`."""

    @abstractmethod
    def load(self, directory: str) -> None:
        """Restore what `save` wrote (all ranks read)."""

    def _save_replica(self, path: str, optimizers: dict, schedulers: dict, scaler_state) -> None:
        """One file with everything of a replicated (DDP-style) run; rank 0 writes it."""
        torch.save({
            "modules": {name: self.unwrap(name).state_dict() for name in self.names},
            "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
            "scaler": scaler_state,
            "ema": self.ema_state(),
        }, path)

    def _load_replica(self, path: str, optimizers: dict, schedulers: dict) -> dict:
        """Restore what `_save_replica` wrote (every rank reads); returns the raw state."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        for name in self.names:
            self.unwrap(name).load_state_dict(state["modules"][name])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.load_ema_state(state.get("ema", {}))
        return state

    def export_state_dicts(self) -> dict[str, dict[str, Any]]:
        """Plain fp32 state_dicts of every network, on CPU."""
        return {name: {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                       for k, v in self.unwrap(name).state_dict().items()}
                for name in self.names}
