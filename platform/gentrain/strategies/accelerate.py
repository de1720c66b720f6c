"""Accelerate: one `accelerate.Accelerator` per worker process, DDP mode, its autocast.

    gentrain run vae/debug strategy.name=accelerate strategy.precision=bf16

Accelerate keeps its state (`AcceleratorState`, `GradientState`) in per-process
singletons. A worker builds one strategy, but tests and restarts inside one process
build several: each new strategy resets those singletons and takes them over, so only
the newest AccelerateStrategy of a process may be used.

Numbers match `DDPStrategy` exactly in fp32: gradient accumulation is the loop's
(`micro_step`), the loss is scaled by 1/grad_accum here, the lr schedule is the
plain torch scheduler of StepSettings (Accelerate's scheduler wrapper would step it once per process).

What Accelerate 1.15 cannot do on a CPU, refused at start-up rather than passed on:
- fp16: it runs plain fp32 without a word (no autocast, no scaler).
- FSDP: it only enters FSDP for GPU-type process groups; on a CPU it keeps DDP
  (cpu=True) or drops distribution altogether (cpu=False), silently either way.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from gentrain.strategies.base import Strategy
from gentrain.strategies.limits import fp16_problem, fsdp_problem

STATE_FILE = "accelerate_state.pt"
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def check_supported(mode: str, precision: str, device: torch.device) -> None:
    """Refuse what Accelerate would silently run as something else (gentrain.strategies.limits)."""
    on_gpu = device.type != "cpu"
    problem = fp16_problem(precision, on_gpu) or fsdp_problem(mode, on_gpu)
    if problem:
        raise ValueError(problem)


def new_accelerator(precision: str, device: torch.device):
    """A fresh Accelerator for this process, on the process group that already exists."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    # A previous strategy in this process (a test, an in-process restart) left its
    # settings in Accelerate's singletons; a new Accelerator would refuse to change them.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        # On CPU Accelerate resets torch's thread count when OMP_NUM_THREADS is unset;
        # the worker's own setting (Ray's, the harness's) is restored below.
        warnings.filterwarnings("ignore", message=".*OMP_NUM_THREADS.*")
        accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=_MIXED_PRECISION[precision],
            # Accumulation is the loop's: Accelerate must neither divide the loss nor
            # skip steps (an explicit plugin also ignores ACCELERATE_GRADIENT_ACCUMULATION_STEPS).
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        )
    torch.set_num_threads(threads)
    _check_state(accelerator, precision, device)
    return accelerator


def _check_state(accelerator, precision: str, device: torch.device) -> None:
    """Fail where Accelerate settled on something other than what the spec asked."""
    from accelerate.utils import DistributedType

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"strategy.name=accelerate: Accelerate sees {accelerator.num_processes} process(es) but "
            f"torch.distributed has {world}; Accelerate reads RANK, WORLD_SIZE and LOCAL_RANK from "
            "the environment (Ray Train and torchrun set them): set them before the strategy starts")
    allowed = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type not in allowed:
        raise RuntimeError(
            f"strategy.accelerate_mode=ddp, but Accelerate chose {accelerator.distributed_type} "
            "(an ACCELERATE_USE_* variable from `accelerate config` is set in this environment?); "
            "unset ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED for gentrain workers")
    if accelerator.mixed_precision != _MIXED_PRECISION[precision]:
        raise RuntimeError(f"strategy.precision: asked for {precision!r}, Accelerate runs "
                           f"{accelerator.mixed_precision!r}")
    if accelerator.device.type != device.type:
        raise RuntimeError(f"Accelerate placed this worker on {accelerator.device}, the trainer on "
                           f"{device}; check scaling.use_gpu and CUDA_VISIBLE_DEVICES")


class AccelerateStrategy(Strategy):
    def __init__(self, section, settings, device):
        super().__init__(section, settings, device)
        check_supported(section.accelerate_mode, section.precision, device)
        self._accelerator = new_accelerator(section.precision, device)
        self.nonfinite.gradients_shared = section.accelerate_mode == "ddp"  # whole gradients all-reduced

    def setup(self, modules, optimizers):
        accelerator = self._accelerator
        names = list(modules)
        # DDP refuses modules without trainable parameters (a frozen feature network):
        # those are only moved, as in DDPStrategy.
        trained = [n for n in names if any(p.requires_grad for p in modules[n].parameters())]
        to_prepare = [modules[n] for n in trained] + list(optimizers.values())
        prepared = accelerator.prepare(*to_prepare) if to_prepare else ()
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self._wrapped = {n: modules[n].to(accelerator.device) for n in names}
        self._wrapped.update(zip(trained, prepared[:len(trained)]))
        for module in self._wrapped.values():
            # Drop the autocast Accelerate patched into `forward` (it also casts outputs to
            # fp32): autocast() below covers training, as in DDPStrategy, so job types see
            # the same dtypes under every strategy and evaluation and samples run in fp32.
            accelerator.unwrap_model(module, keep_fp32_wrapper=False)
        self._optimizers = dict(zip(optimizers, prepared[len(trained):]))
        # The schedule is stepped by hand on the plain optimizer: Accelerate's scheduler
        # wrapper steps once per process per call unless batches are split.
        self._schedulers = {name: self.settings.scheduler(opt.optimizer)
                            for name, opt in self._optimizers.items()}

    @property
    def names(self):
        return list(self._wrapped)

    def module(self, name: str) -> nn.Module:
        return self._wrapped[name]

    def unwrap(self, name: str) -> nn.Module:
        return self._accelerator.unwrap_model(self._wrapped[name])

    def autocast(self):
        return self._accelerator.autocast()

    def _no_sync(self, skip_sync: bool):
        if not skip_sync:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for module in self._wrapped.values():
            stack.enter_context(self._accelerator.no_sync(module))
        return stack

    def backward(self, loss, name):
        # Divided here, not by Accelerate (its accumulation steps are 1): the same
        # scaling as DDPStrategy, so gradients and losses match it exactly.
        self._accelerator.backward(loss / self.grad_accum)

    def step(self, name):
        if not self._last_micro:
            return {}
        optimizer = self._optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        accelerator = self._accelerator
        if accelerator.scaler is not None:
            # fp16 (GPU): Accelerate's clip_grad_norm_ unscales *every* optimizer's
            # gradients; a GAN accumulating the other network's gradients would have them
            # unscaled twice. Unscale this optimizer only (gradients already all-reduced).
            accelerator.unscale_gradients(optimizer)
        # DDP has all-reduced the gradients: this is the true global norm. Checked before
        # clipping, which would spread one non-finite gradient over all of them.
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not self._update_allowed(name, grad_norm, lambda: self._drop(optimizer)):
            return {}
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # fp16: an overflow skips the update; the schedule waits too (as under DDP/DeepSpeed).
        if not getattr(optimizer, "step_was_skipped", False):
            self._schedulers[name].step()
        return {"grad_norm": float(grad_norm)}

    def _lr_schedulers(self):
        return list(self._schedulers.values())

    def _drop(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self._accelerator.scaler is not None:
            self._accelerator.scaler.update()  # unscaled in step: the scaler expects an update

    def save(self, directory, rank):
        if rank == 0:  # DDP replicas are identical: one copy is enough
            scaler = self._accelerator.scaler
            self._save_replica(os.path.join(directory, STATE_FILE),
                               scaler.state_dict() if scaler is not None else None)

    def checkpoint_files(self, rank, exported):
        scaler = self._accelerator.scaler
        return self._replica_files(rank, exported, STATE_FILE, scaler.state_dict() if scaler is not None else None)

    def portable_state(self):
        return self._portable_replica(self._optimizers, self._schedulers)

    def load_portable(self, directory):
        self._load_portable_replica(directory, self._optimizers, self._schedulers)

    def load(self, directory):
        state = self._load_replica(os.path.join(directory, STATE_FILE), self._optimizers,
                                   self._schedulers)
        scaler = self._accelerator.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
