"""DDP: torch DistributedDataParallel (gloo on CPU, nccl on GPU) with torch autocast.

fp16 uses a GradScaler (GPU only; the spec check refuses fp16 on CPU workers), bf16
uses autocast alone, fp32 neither.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gentrain.strategies.base import LOW_PRECISION_DTYPES, Strategy

STATE_FILE = "ddp_state.pt"


class DDPStrategy(Strategy):
    def __init__(self, section, settings, device):
        super().__init__(section, settings, device)
        self.nonfinite.gradients_shared = True  # DDP all-reduces whole gradients

    def setup(self, modules, optimizers):
        self._plain = {name: module.to(self.device) for name, module in modules.items()}
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self._wrapped = {}
        for name, module in self._plain.items():
            has_params = any(p.requires_grad for p in module.parameters())
            if distributed and has_params:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self._wrapped[name] = DistributedDataParallel(module, device_ids=device_ids)
            else:
                self._wrapped[name] = module
        self._optimizers = dict(optimizers)
        self._schedulers = {name: self.settings.scheduler(opt) for name, opt in self._optimizers.items()}
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.section.precision == "fp16")

    @property
    def names(self):
        return list(self._plain)

    def module(self, name: str) -> nn.Module:
        return self._wrapped[name]

    def unwrap(self, name: str) -> nn.Module:
        return self._plain[name]

    def autocast(self):
        dtype = LOW_PRECISION_DTYPES.get(self.section.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _no_sync(self, skip_sync: bool):
        if not skip_sync:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for module in self._wrapped.values():
            if isinstance(module, DistributedDataParallel):
                stack.enter_context(module.no_sync())
        return stack

    def backward(self, loss, name):
        self._scaler.scale(loss / self.grad_accum).backward()

    def step(self, name):
        if not self._last_micro:
            return {}
        optimizer = self._optimizers[name]
        self._scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # DDP has all-reduced the gradients: this norm is the true global norm. Checked
        # before clipping, which would spread one non-finite gradient over all of them.
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not self._update_allowed(name, grad_norm, lambda: self._drop(optimizer)):
            return {}
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm)
        scale = self._scaler.get_scale() if self._scaler.is_enabled() else None
        self._scaler.step(optimizer)
        self._scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # fp16: an overflow skips the update and lowers the scale; the schedule waits too,
        # as DeepSpeed's engine does, so both strategies see the same learning rates.
        if scale is None or self._scaler.get_scale() >= scale:
            self._schedulers[name].step()
        return {"grad_norm": float(grad_norm)}

    def _lr_schedulers(self):
        return list(self._schedulers.values())

    def _drop(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self._scaler.is_enabled():
            self._scaler.update()  # unscale_ was called: the scaler expects an update

    def save(self, directory, rank):
        if rank == 0:  # replicas are identical: one copy is enough
            self._save_replica(os.path.join(directory, STATE_FILE), self._scaler.state_dict())

    def checkpoint_files(self, rank, exported):
        return self._replica_files(rank, exported, STATE_FILE, self._scaler.state_dict())

    def portable_state(self):
        return self._portable_replica(self._optimizers, self._schedulers)

    def load_portable(self, directory):
        self._load_portable_replica(directory, self._optimizers, self._schedulers)

    def load(self, directory):
        state = self._load_replica(os.path.join(directory, STATE_FILE), self._optimizers,
                                   self._schedulers)
        self._scaler.load_state_dict(state["scaler"])
