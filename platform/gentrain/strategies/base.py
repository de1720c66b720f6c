"""The strategy interface: how modules are wrapped, stepped, reduced and saved.

A job type never knows which strategy runs it. It calls, through its step context:

    with ctx.autocast():
        loss = ...(ctx.module("vae")(batch))
    ctx.backward(loss, "vae")
    ctx.step("vae")          # clip, optimizer step, lr schedule, zero grads

Gradient accumulation lives here too: the loop opens `micro_step(is_last)` around each
micro-batch; `backward` scales the loss and `step` only steps on the last micro-batch.

A strategy receives its own section (spec.strategy), the StepSettings below (batch size,
accumulation, clipping, the lr schedule) and the optimizers already built
(gentrain.optim), never the whole spec. Everything the engine, the evaluation and the
job types read from it is declared in `Strategy`: nothing is looked up with getattr.
"""

from __future__ import annotations

import contextlib
import functools
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from gentrain.ema import EMA
from gentrain.nonfinite import NonFiniteFound, NonFiniteGuard, SpecFacts, first_nonfinite
from gentrain.optim import make_scheduler
from gentrain.spec import StrategySection, TrainSection

# strategy.precision -> the dtype of autocast (ddp, bench) and of DeepSpeed engines; fp32: none.
LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def read_portable(directory: str, device: torch.device) -> tuple[dict, dict]:
    """model.pt and the portable file of a checkpoint folder; a clear error without the latter."""
    from gentrain.checkpoint import MODEL_FILE
    from gentrain.strategies.portable import PORTABLE_FILE

    path = os.path.join(directory, PORTABLE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: this checkpoint has no strategy-neutral optimizer state (written by a gentrain "
            "before it saved one, or under a DeepSpeed optimizer wrapper it cannot gather per parameter, "
            "such as ZeRO 0 bf16's FP16_UnfusedOptimizer), so it can only continue with the scaling.num_workers and strategy.* "
            "that wrote it (see gentrain.json: world_size, spec.strategy)")
    weights = torch.load(os.path.join(directory, MODEL_FILE), map_location=device, weights_only=True)
    return weights, torch.load(path, map_location="cpu", weights_only=True)


def replica_state(scaler_state) -> dict:
    """A replicated strategy's own file (ddp_state.pt, accelerate_state.pt): the loss scaler only."""
    return {"scaler": scaler_state}


def constant_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@dataclass(frozen=True)
class StepSettings:
    """What a strategy needs to know of the training (from spec.train); the rest of the spec
    is not its business. Its own section (spec.strategy) comes beside it."""

    batch_size: int  # per rank per micro-batch: DeepSpeed's config counts it
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    # optimizer -> its lr schedule, stepped once per optimizer step
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] = constant_lr
    nonfinite: str = "stop"  # a non-finite loss or gradient: stop, skip or rollback (gentrain.nonfinite)
    nonfinite_max_skips: int = 10
    nonfinite_max_rollbacks: int = 3  # for the advice; the engine rolls back

    @classmethod
    def from_train(cls, train: TrainSection) -> StepSettings:
        return cls(batch_size=train.batch_size, grad_accum=train.grad_accum, grad_clip=train.grad_clip,
                   scheduler=functools.partial(make_scheduler, total_steps=train.steps, schedule=train.schedule),
                   nonfinite=train.nonfinite, nonfinite_max_skips=train.nonfinite_max_skips,
                   nonfinite_max_rollbacks=train.nonfinite_max_rollbacks)


class Strategy(ABC):
    """One interface for DDP, DeepSpeed and Accelerate."""

    def __init__(self, section: StrategySection, settings: StepSettings, device: torch.device):
        self.section = section  # spec.strategy: name, precision and the strategy's own options
        self.settings = settings
        self.device = device
        self.grad_accum = settings.grad_accum
        self.grad_clip = settings.grad_clip
        self.ema = EMA(self.full_weights)  # averaged weights: ctx.ema_update fills it
        # Checked before every update (gentrain.nonfinite); under fp16 the loss scaler
        # handles gradient overflow itself, so only the loss is checked there.
        self.nonfinite = NonFiniteGuard(settings.nonfinite, settings.nonfinite_max_skips,
                                        check_gradients=section.precision != "fp16")
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._last_micro = True

    # -- set-up -----------------------------------------------------------------
    @abstractmethod
    def setup(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Move, wrap and own the modules and their optimizers."""

    def construction(self) -> contextlib.AbstractContextManager:
        """Entered while the job type builds its networks (before `setup`): sharded strategies
        partition parameters as they are created, so no rank holds the whole model."""
        return contextlib.nullcontext()

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

    def nonfinite_facts(self, name: str, rollbacks: int = 0) -> SpecFacts:
        """What the advice of a non-finite stop depends on."""
        return SpecFacts(self.settings.nonfinite, self.settings.nonfinite_max_skips, self.grad_clip,
                         self.section.precision, self.lr(name), self.base_lr(name),
                         self.settings.nonfinite_max_rollbacks, rollbacks)

    def base_lr(self, name: str) -> float | None:
        """`name`'s learning rate before the schedule (the spec's, or the job type's for it)."""
        optimizer = self._optimizers.get(name)
        return optimizer.param_groups[0].get("initial_lr") if optimizer is not None else None

    def _update_allowed(self, name: str, grad_norm: torch.Tensor | None, drop: Callable[[], None]) -> bool:
        """Replicated strategies (DDP, Accelerate): the gradients are all-reduced, so their
        norm is the global one; the guard adds the ranks' loss flags (gentrain.nonfinite).
        `drop` discards the gradients of a step that is not made: skipped, or ending in a
        stop or a rollback (which then restores a clean state)."""
        bad = None if grad_norm is None else ~torch.isfinite(grad_norm)
        try:
            allowed = self.nonfinite.allows_update(
                name, bad, lambda flags: self.all_reduce(flags, op="sum"),
                lambda skip: first_nonfinite(((key, p.grad) for key, p in self.unwrap(name).named_parameters()), skip))
        except NonFiniteFound:
            drop()
            raise
        if not allowed:
            drop()
        return allowed

    def drop_gradients(self) -> None:
        """Every network's pending gradients dropped (a rollback, before it restores: a
        network whose backward ran but whose step did not still holds them)."""
        for optimizer in self._optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.nonfinite.forget_pending()

    @abstractmethod
    def _lr_schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler]:
        """Every trained network's lr schedule (each holds the optimizer it sets)."""

    def scale_lr(self, factor: float) -> None:
        """Multiply every network's learning rate by `factor`, for the rest of the run: the
        schedule's base rates (which its state_dict, and so every checkpoint, carries), the
        optimizer's current and initial rates (train.nonfinite=rollback)."""
        for scheduler in self._lr_schedulers():
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def lr(self, name: str) -> float | None:
        """The current learning rate of `name`'s optimizer (None: `name` is not trained).

        Strategies that keep torch optimizers in `self._optimizers` need not override it.
        """
        optimizer = self._optimizers.get(name)
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

    # -- full weights and evaluation ---------------------------------------------------
    def gathered(self, name: str) -> contextlib.AbstractContextManager:
        """Full parameters of `name` readable inside (ZeRO-3 overrides this to gather)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self, name: str) -> Iterator[nn.Module]:
        """The plain network `name` with all its weights readable inside (the EMA reads it)."""
        with self.gathered(name):
            yield self.unwrap(name)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the networks' parameters hold in training: inputs fed to
        `module(name)` outside autocast should have it (fp32 unless an engine casts the network)."""
        return torch.float32

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[dict[str, nn.Module]]:
        """Modules for sampling and evaluation: EMA weights where kept, in eval mode."""
        with contextlib.ExitStack() as stack:
            modules = {}
            for name in self.names:
                average = self.ema.get(name)  # not `or`: containers (nn.Sequential) are truthy by length
                modules[name] = average if average is not None else stack.enter_context(self.full_weights(name))
            was_training = {name: m.training for name, m in modules.items()}
            for module in modules.values():
                module.eval()
            try:
                yield modules
            finally:
                for name, module in modules.items():
                    module.train(was_training[name])

    # -- checkpoints ------------------------------------------------------------
    def write_checkpoint(self, directory: str, rank: int, exported: dict | None = None) -> None:
        """The training state a checkpoint folder holds, all of what `load` reads: this rank's
        share (`save`) and, on rank 0, the strategy-neutral optimizer and schedule state
        (portable_state.pt: what a resume on another world size or strategy reads) and the
        plain fp32 weights and EMA (model.pt: what sampling, eval and scoring load without
        the strategy). `exported`: `export_state_dicts()` if the caller has it already.
        A collective under ZeRO."""
        exported = self.export_state_dicts() if exported is None else exported
        files = self.checkpoint_files(rank, exported)
        if files is None:  # the strategy writes its share itself
            self.save(directory, rank)
            files = self._neutral_files(rank, exported)
        for name, state in files.items():
            torch.save(state, os.path.join(directory, name))

    def checkpoint_files(self, rank: int, exported: dict) -> dict[str, Any] | None:
        """Everything `write_checkpoint` writes on this rank, as {file name: object to
        torch.save}, without writing it: what checkpoint.asynchronous copies to host memory
        at the step and writes in the background. None: the strategy writes its share
        itself, from its live state (DeepSpeed's engine); it then has no asynchronous form.
        The objects may share memory with the training state: copy before training on."""
        return None

    def _neutral_files(self, rank: int, exported: dict) -> dict[str, Any]:
        """portable_state.pt and model.pt, on rank 0 (`portable_state` is a collective under ZeRO)."""
        from gentrain.checkpoint import MODEL_FILE
        from gentrain.strategies.portable import PORTABLE_FILE

        portable = self.portable_state()
        if rank != 0:
            return {}
        files = {}
        if portable is not None:  # None: a layout gentrain cannot gather (same-setup resume only)
            files[PORTABLE_FILE] = portable
        files[MODEL_FILE] = {"networks": exported, "ema": self.ema.state_dict()}
        return files

    @abstractmethod
    def save(self, directory: str, rank: int) -> None:
        """Write this rank's share of the training state into `directory` (its part of
        `write_checkpoint`, which writes the rest)."""

    @abstractmethod
    def load(self, directory: str) -> None:
        """Restore what `write_checkpoint` wrote (all ranks read)."""

    @abstractmethod
    def portable_state(self) -> dict:
        """The strategy-neutral optimizer and schedule state (gentrain.strategies.portable),
        full on rank 0 (a collective under ZeRO; other ranks may return anything). Its tensors
        are private CPU copies (checkpoint.asynchronous writes them without copying again)."""

    @abstractmethod
    def load_portable(self, directory: str) -> None:
        """Restore from model.pt and the portable file a run of any world size and strategy
        wrote (every rank reads both; sharded strategies keep their own share)."""

    def _portable_replica(self, optimizers: dict, schedulers: dict) -> dict:
        from gentrain.strategies.portable import named_optimizer_state

        return {"optimizers": {name: named_optimizer_state(o, self.unwrap(name)) for name, o in optimizers.items()},
                "schedulers": {name: s.state_dict() for name, s in schedulers.items()}}

    def _load_portable_replica(self, directory: str, optimizers: dict, schedulers: dict) -> None:
        from gentrain.strategies.portable import load_named_optimizer_state

        weights, portable = read_portable(directory, self.device)
        for name in self.names:
            self.unwrap(name).load_state_dict(weights["networks"][name])
        for name, optimizer in optimizers.items():
            load_named_optimizer_state(optimizer, self.unwrap(name), portable["optimizers"][name], name)
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(portable["schedulers"][name])
        self.ema.load_state_dict(weights.get("ema", {}))

    def _save_replica(self, path: str, scaler_state) -> None:
        """A replicated (DDP-style) run's own file, written by rank 0: the loss scaler only.
        Weights, EMA, optimizer moments and schedules are in model.pt and portable_state.pt,
        which the engine writes beside it, and are read back from there: one copy of each
        (a full copy here made a checkpoint about a third larger)."""
        torch.save(replica_state(scaler_state), path)

    def _replica_files(self, rank: int, exported: dict, state_file: str, scaler_state) -> dict[str, Any]:
        """A replicated strategy's `checkpoint_files`: the neutral pair and, on rank 0, its own file."""
        files = self._neutral_files(rank, exported)
        if rank == 0:
            files[state_file] = replica_state(scaler_state)
        return files

    def _load_replica(self, path: str, optimizers: dict, schedulers: dict) -> dict:
        """Restore what `_save_replica` wrote and the state beside it (every rank reads);
        returns the file's raw state. A file that still holds everything (gentrain before
        2026-12) is read as it was written."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        if "optimizers" not in state:
            self._load_portable_replica(os.path.dirname(path), optimizers, schedulers)
            return state
        for name in self.names:
            self.unwrap(name).load_state_dict(state["modules"][name])
        from gentrain.strategies.portable import with_own_implementation

        for name, optimizer in optimizers.items():
            saved = state["optimizers"][name]
            optimizer.load_state_dict({**saved, "param_groups": [
                {**with_own_implementation(group, own), "params": group["params"]}
                for group, own in zip(saved["param_groups"], optimizer.param_groups)]})
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.ema.load_state_dict(state.get("ema", {}))
        return state

    def export_state_dicts(self) -> dict[str, dict[str, Any]]:
        """Plain fp32 state_dicts of every network, on CPU."""
        return {name: {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                       for k, v in self.unwrap(name).state_dict().items()}
                for name in self.names}
