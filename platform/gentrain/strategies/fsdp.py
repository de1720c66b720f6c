"""FSDP2: torch's `fully_shard` (parameters, gradients and optimizer state sharded over the ranks).

    gentrain run vae/debug strategy.name=fsdp

Runs on CPU workers (gloo) as on GPUs (nccl) in torch 2.13. Each trained network is sharded
as one unit (`fully_shard` on the network: its parameters are gathered for its forward and
backward, and sharded again after); its optimizer, built by the job type before sharding,
is pointed at the sharded parameters (it holds no state yet). Precision as under ddp: torch
autocast for bf16, no casting of the stored weights.

Checkpoints are the strategy-neutral form itself (model.pt: full weights and EMA;
portable_state.pt: optimizer state per parameter name, gathered whole), so an fsdp run continues on any world size or
strategy and any run continues under fsdp.

Sampling, evaluation and the EMA read whole, hook-free copies of the networks, rebuilt from
a meta-device skeleton with the gathered weights (every rank gathers: a collective), so rank
0 alone may run the networks forward as often as it likes.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from gentrain.strategies.base import LOW_PRECISION_DTYPES, Strategy


class FSDPStrategy(Strategy):
    def __init__(self, section, settings, device):
        super().__init__(section, settings, device)
        if section.precision == "fp16":
            raise ValueError("strategy.precision: 'fp16' is not built for strategy.name=fsdp (no loss "
                             "scaling); use strategy.precision=bf16")

    def setup(self, modules, optimizers):
        if not torch.distributed.is_initialized():
            raise RuntimeError("strategy.name=fsdp needs a torch.distributed process group (Ray Train "
                               "creates one in every worker); run through `gentrain run`, or call "
                               "init_process_group first")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from gentrain.strategies.portable import parameter_names

        self._mesh = init_device_mesh(self.device.type, (torch.distributed.get_world_size(),))
        self._plain = {}
        self._skeletons = {}
        self._ties = {}
        for name, module in modules.items():
            module.to(self.device)
            optimizer = optimizers.get(name)
            if optimizer is not None:
                self._skeletons[name] = copy.deepcopy(module).to("meta")  # structure only
                self._ties[name] = tied_parameters(module)
                names = parameter_names(module)
                groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
                fully_shard(module, mesh=self._mesh)
                sharded = dict(module.named_parameters())
                for group, group_names in zip(optimizer.param_groups, groups):
                    group["params"] = [sharded[n] for n in group_names]  # no state yet: nothing else to move
            self._plain[name] = module
        self._optimizers = dict(optimizers)
        self._schedulers = {name: self.settings.scheduler(opt) for name, opt in self._optimizers.items()}

    @property
    def names(self):
        return list(self._plain)

    def module(self, name: str) -> nn.Module:
        return self._plain[name]

    def unwrap(self, name: str) -> nn.Module:
        return self._plain[name]

    def autocast(self):
        dtype = LOW_PRECISION_DTYPES.get(self.section.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def _no_sync(self, skip_sync: bool) -> Iterator[None]:
        sharded = [self._plain[name] for name in self._skeletons]
        for module in sharded:
            module.set_requires_gradient_sync(not skip_sync)
        try:
            yield
        finally:
            for module in sharded:
                module.set_requires_gradient_sync(True)

    def backward(self, loss, name):
        (loss / self.grad_accum).backward()

    def step(self, name):
        if not self._last_micro:
            return {}
        optimizer = self._optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # The gradients are reduce-scattered: the norm of the shards is a collective, the
        # global norm on every rank.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = _full(norm)
        if not self._update_allowed(name, grad_norm, lambda: optimizer.zero_grad(set_to_none=True)):
            return {}
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._schedulers[name].step()
        return {"grad_norm": float(grad_norm)}

    def _lr_schedulers(self):
        return list(self._schedulers.values())

    # -- full weights -----------------------------------------------------------------------
    @torch.no_grad()
    def _whole_copy(self, name: str) -> nn.Module:
        """A plain, hook-free copy of `name` with its full weights (a collective)."""
        module = self._plain[name]
        if name not in self._skeletons:
            return module
        whole = copy.deepcopy(self._skeletons[name]).to_empty(device=self.device)
        tie(whole, self._ties[name])  # moving to and from meta gave each owner its own parameter
        for key, param in module.named_parameters():
            whole.get_parameter(key).copy_(_full(param.detach()))
        for key, buffer in module.named_buffers():  # FSDP leaves buffers whole on every rank
            whole.get_buffer(key).copy_(buffer)
        whole.train(module.training)
        return whole

    @contextlib.contextmanager
    def full_weights(self, name: str) -> Iterator[nn.Module]:
        yield self._whole_copy(name)

    # evaluation: the base class's, over full_weights (the whole copies above)

    @torch.no_grad()
    def export_state_dicts(self):
        return {name: {key: _full(value.detach()).float().cpu().clone() if value.is_floating_point()
                       else _full(value).cpu().clone()
                       for key, value in self._plain[name].state_dict().items()}
                for name in self.names}

    # -- checkpoints: the strategy-neutral form is fsdp's own ---------------------------------
    def portable_state(self):
        """Every parameter's optimizer state gathered whole (a collective), by name."""
        from gentrain.strategies.portable import hyperparameters, parameter_names

        optimizers = {}
        for name, optimizer in self._optimizers.items():
            names = parameter_names(self._plain[name])
            optimizers[name] = {
                "state": {names[id(p)]: {key: _full(value.detach()).cpu().clone() if torch.is_tensor(value) else value
                                         for key, value in optimizer.state[p].items()}
                          for group in optimizer.param_groups for p in group["params"] if optimizer.state.get(p)},
                "param_groups": [{**hyperparameters(group), "params": [names[id(p)] for p in group["params"]]}
                                 for group in optimizer.param_groups]}
        return {"optimizers": optimizers, "schedulers": {name: s.state_dict() for name, s in self._schedulers.items()}}

    def load_portable(self, directory):
        from gentrain.strategies.base import read_portable
        from gentrain.strategies.portable import check_groups, parameter_names

        weights, portable = read_portable(directory, torch.device("cpu"))
        for name, module in self._plain.items():
            full = weights["networks"][name]
            if name not in self._skeletons:
                module.load_state_dict(full)
                continue
            with torch.no_grad():  # into the shards in place: the optimizer holds these parameters
                for key, param in module.named_parameters():
                    _local(param).copy_(_local(_shard_like(full[key], param)))
                for key, buffer in module.named_buffers():
                    if key in full:  # persistent buffers (the others are rebuilt by the network)
                        buffer.copy_(full[key])
        for name, optimizer in self._optimizers.items():
            names = parameter_names(self._plain[name])
            check_groups([[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
                         portable["optimizers"][name], name)
            saved = portable["optimizers"][name]
            params = dict(self._plain[name].named_parameters())
            for key, state in saved["state"].items():  # each rank keeps the shards of its parameters
                param = params[key]
                optimizer.state[param] = {k: _shard_like(v, param) for k, v in state.items()}
            for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        for name, scheduler in self._schedulers.items():
            scheduler.load_state_dict(portable["schedulers"][name])
        self.ema.load_state_dict(weights.get("ema", {}))

    def checkpoint_files(self, rank, exported):
        return self._neutral_files(rank, exported)  # gathered whole on the training thread

    def save(self, directory, rank):
        pass  # model.pt and portable_state.pt (the engine writes both) are the whole state

    def load(self, directory):
        self.load_portable(directory)


def tied_parameters(module: nn.Module) -> list[tuple[str, str]]:
    """(name, name of the parameter it is): every parameter `module` holds under more than one
    name (a tied embedding and output head), as it is now."""
    first: dict[int, str] = {}
    ties = []
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            ties.append((name, first[id(parameter)]))
        else:
            first[id(parameter)] = name
    return ties


def tie(module: nn.Module, ties: list[tuple[str, str]]) -> None:
    """Make `module` share parameters as `tied_parameters` listed. `Module.to("meta")` and
    `to_empty` replace each owner's parameter by a new one, untying them: a copy rebuilt that
    way would otherwise keep an uninitialised head (the fsdp transformer's evaluation NLL
    overflowed so)."""
    for name, target in ties:
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, module.get_parameter(target))


def _shard_like(value, param):
    """A full per-element optimizer state tensor as `param`'s shards; other values as they are.
    (Not torch.distributed.checkpoint.state_dict's get/set_optimizer_state_dict: through them,
    Adam's step count read one more than was saved in tests/distributed/test_reshard.py.)"""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if torch.is_tensor(value) and isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.clone() if torch.is_tensor(value) else value


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
