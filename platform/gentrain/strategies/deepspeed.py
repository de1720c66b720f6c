"""DeepSpeed: one native engine per trained network, ZeRO stage 0-3, CPU offload, bf16/fp16.

    gentrain run vae/debug strategy.name=deepspeed strategy.zero_stage=3 strategy.precision=bf16

gentrain's own settings (batch size, accumulation, clipping, ZeRO stage, offload, precision)
become the engine's DeepSpeed config; a raw `strategy.deepspeed_config` is merged under
them, and a key gentrain sets with another value is an error naming the spec field to use.
The optimizers are the torch optimizers the job type built (same numbers as ddp, and no
FusedAdam or CPUAdam compile) and the lr schedule is gentrain's, stepped by the engine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, Iterator

import torch
from torch import nn

from gentrain.ema import EMA
from gentrain.nonfinite import NonFiniteFound
from gentrain.schema import SpecError
from gentrain.spec import StrategySection
from gentrain.strategies.base import LOW_PRECISION_DTYPES, StepSettings, Strategy

EXTRA_FILE = "gentrain_deepspeed.pt"  # EMA weights and untrained modules, written by rank 0

# DeepSpeed config keys that gentrain sets, and the spec field a user changes instead.
_SPEC_FIELD = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "managed_gradient_accumulation": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "strategy.precision",
    "fp16.enabled": "strategy.precision",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_param",
    "zero_allow_untested_optimizer": "train.optimizer",
    "zero_force_ds_cpu_optimizer": "train.optimizer",
}
# Keys gentrain owns outright: the optimizers come from the job type, the schedule from the spec.
_OWNED = {"optimizer": "train.optimizer", "scheduler": "train.schedule"}


# -- the config ---------------------------------------------------------------------------
def gentrain_settings(strategy: StrategySection, settings: StepSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config keys that the spec decides."""
    return {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "train_batch_size": settings.batch_size * settings.grad_accum * world_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "managed_gradient_accumulation": True,  # the loop marks each accumulation boundary
        "gradient_clipping": settings.grad_clip or 0.0,  # DeepSpeed: 0 disables clipping
        "bf16": {"enabled": strategy.precision == "bf16"},
        "fp16": {"enabled": strategy.precision == "fp16"},
        "zero_optimization": {
            "stage": strategy.zero_stage,
            "offload_optimizer": {"device": "cpu" if strategy.offload_optimizer else "none"},
            "offload_param": {"device": "cpu" if strategy.offload_param else "none"},
        },
        # The job type's torch optimizers run under ZeRO (SGD is "untested" to DeepSpeed) and
        # on offloaded CPU partitions (DeepSpeed otherwise demands its compiled CPUAdam).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def deepspeed_config(strategy: StrategySection, settings: StepSettings, world_size: int) -> dict[str, Any]:
    """gentrain's settings over the user's raw `strategy.deepspeed_config`; conflicts raise."""
    raw = strategy.deepspeed_config
    problems = [f"strategy.deepspeed_config.{key}: gentrain passes its own {key} (built from "
                f"{field}); remove this key and set {field} instead"
                for key, field in _OWNED.items() if key in raw]
    sections = {"strategy": strategy, "train": settings}
    merged = _merge(gentrain_settings(strategy, settings, world_size), raw, "", sections, problems)
    if problems:
        raise SpecError(problems, "strategy.deepspeed_config")
    return merged


def _merge(ours: dict, theirs: dict, prefix: str, sections: dict, problems: list[str]) -> dict:
    merged = copy.deepcopy(theirs)
    for key, value in ours.items():
        path = f"{prefix}{key}"
        if key not in theirs:
            merged[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(theirs[key], dict):
            merged[key] = _merge(value, theirs[key], f"{path}.", sections, problems)
        elif theirs[key] != value:
            problems.append(_conflict(path, theirs[key], value, sections))
    return merged


def _conflict(path: str, theirs: Any, ours: Any, sections: dict) -> str:
    field = _SPEC_FIELD.get(path)
    if field is None:  # a section that gentrain fills in, given as something else
        return (f"strategy.deepspeed_config.{path}: {_show(theirs)} must be a mapping: gentrain "
                f"sets {_show(ours)} there from the spec")
    section, _, name = field.partition(".")
    if not hasattr(sections[section], name):  # train.optimizer: the strategy never sees it
        return (f"strategy.deepspeed_config.{path}: {_show(theirs)} conflicts with what gentrain sets "
                f"for {field} ({path}: {_show(ours)}); remove this key")
    shown = _show(getattr(sections[section], name))
    note = "" if shown == _show(ours) else f" (gentrain sets {path}: {_show(ours)})"
    return (f"strategy.deepspeed_config.{path}: {_show(theirs)} conflicts with {field}: "
            f"{shown}{note}; set {field} instead")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


# -- the strategy -------------------------------------------------------------------------
class DeepSpeedStrategy(Strategy):
    def __init__(self, section, settings, device):
        super().__init__(section, settings, device)
        # EMA copies without what ZeRO hangs on the network (hooks, partitions): _detached_copy.
        self.ema = EMA(self.full_weights, copy=lambda module: _detached_copy(module).eval())

    def construction(self):
        """ZeRO-3: networks are built inside `deepspeed.zero.Init`, each module's parameters
        partitioned over the ranks as soon as the module is made (same values as a whole build:
        every rank draws the same seeded initialisation, then keeps its share). Built in fp32
        whatever the precision: under bf16/fp16 zero.Init would make every floating tensor
        created in the build (random draws, buffers) low precision, unlike a whole build, and
        fail where CPU kernels have no bf16 (flow's QR); setup casts the shares (_cast_shares)."""
        if self.section.zero_stage != 3 or not torch.distributed.is_initialized():
            return contextlib.nullcontext()
        deepspeed = _import_deepspeed(self.device)
        config = deepspeed_config(self.section, self.settings, torch.distributed.get_world_size())
        # DeepSpeed's communication layer may not know the world yet (deepspeed.initialize sets
        # it up later): its config check would count one rank. The global batch follows anyway.
        config.pop("train_batch_size")
        return deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.float32,
                                   remote_device="cpu" if self.section.offload_param else None)

    def setup(self, modules, optimizers):
        if not torch.distributed.is_initialized():
            raise RuntimeError("strategy.name=deepspeed needs a torch.distributed process group "
                               "(Ray Train creates one in every worker); run through "
                               "`gentrain run`, or call init_process_group first")
        self._plain = dict(modules)
        from gentrain.strategies.portable import parameter_names

        # Each optimizer's parameter groups by name, before ZeRO flattens them (portable_state).
        self._group_names = {}
        for name, optimizer in optimizers.items():
            names = parameter_names(modules[name])
            self._group_names[name] = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        config = deepspeed_config(self.section, self.settings, torch.distributed.get_world_size())
        for name in optimizers:
            _cast_shares(modules[name], self.input_dtype)
        self._engines = {name: self._engine(name, module, optimizers[name], config)
                         for name, module in modules.items() if name in optimizers}
        if self.settings.nonfinite != "stop":  # skip and rollback go on after dropping an update
            for engine in self._engines.values():
                _check_can_drop(engine.optimizer, self.settings.nonfinite)
        for name, module in modules.items():
            if name not in self._engines:  # untrained (frozen) networks stay plain (and whole)
                _unpartitioned(module)
                module.to(self.device)

    def _engine(self, name: str, module: nn.Module, optimizer, config: dict):
        deepspeed = _import_deepspeed(self.device)
        try:
            # The callable builds gentrain's schedule on the optimizer the engine steps.
            engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=self.settings.scheduler,
                                              config=copy.deepcopy(config), dist_init_required=False)
        except ValueError as exc:
            if "fp16 is not supported" in str(exc):
                raise ValueError(f"strategy.precision: 'fp16' is not supported by DeepSpeed on "
                                 f"this device ({self.device}); use strategy.precision=bf16 "
                                 "(or fp32)") from exc
            raise
        return engine

    @property
    def names(self):
        return list(self._plain)

    def module(self, name: str) -> nn.Module:
        return self._engines[name] if name in self._engines else self._plain[name]

    def unwrap(self, name: str) -> nn.Module:
        return self._plain[name]  # the engine's own .module: same object

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the engines' parameters hold: bf16/fp16 engines cast the whole network."""
        return LOW_PRECISION_DTYPES.get(self.section.precision, torch.float32)

    def autocast(self):
        # A bf16 engine holds bf16 weights; autocast casts fp32 inputs at matmuls and convs
        # (and keeps reductions such as losses and norms in fp32), so jobs feed fp32 data.
        dtype = LOW_PRECISION_DTYPES.get(self.section.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one step -------------------------------------------------------------------------
    def backward(self, loss, name):
        engine = self._engines[name]
        # The loop, not DeepSpeed's micro-step counter, decides where accumulation ends.
        engine.set_gradient_accumulation_boundary(self._last_micro)
        with self._passing_through(name):
            engine.backward(loss)  # divides by gradient_accumulation_steps itself

    @contextlib.contextmanager
    def _passing_through(self, name: str) -> Iterator[None]:
        """Let `name`'s loss run back through the other networks' engines.

        A GAN's generator loss runs through the discriminator's engine forward. Without ZeRO,
        DeepSpeed 0.19.8 refuses any backward through an engine that the engine itself did
        not start ("Direct calls to tensor.backward() are not supported"); marked as inside
        a backward, it lets the gradient pass unchanged (ZeRO engines already do).
        """
        others = [engine for other, engine in self._engines.items() if other != name
                  and not engine._support_torch_style_backward and not engine._running_engine_backward]
        for engine in others:
            engine._running_engine_backward = True
        try:
            yield
        finally:
            for engine in others:
                engine._running_engine_backward = False

    def step(self, name):
        engine = self._engines[name]
        engine.set_gradient_accumulation_boundary(self._last_micro)
        norm = None
        if self._last_micro and not hasattr(engine.optimizer, "_global_grad_norm"):
            # Plain fp32 without ZeRO: DeepSpeed computes no norm, but the gradients are
            # already all-reduced here, so this is the true global norm before clipping.
            norm = _grad_norm(engine.module)
        if self._last_micro:
            # Before engine.step(), by gentrain's all-reduced decision (losses included):
            # DeepSpeed alone applies a NaN gradient under ZeRO 0 in fp32 (the plain torch
            # optimizer) and skips it silently elsewhere (its invalid-norm check).
            try:
                allowed = self.nonfinite.allows_update(
                    name, _local_gradients_bad(engine), lambda flags: self.all_reduce(flags, op="sum"),
                    lambda skip: _first_nonfinite_full(engine))  # no sentinel under ZeRO: skip is None
            except NonFiniteFound:
                if _overflow_kind(engine.optimizer) is not None:
                    _drop_step(engine)  # stop or rollback: nothing left half-reduced in the engine
                raise
            if not allowed:  # skip
                _drop_step(engine)
                return {}
        engine.step()  # every micro-step: the engine only updates at the boundary
        if not self._last_micro:
            return {}
        if norm is None:
            norm = engine.get_global_grad_norm()
        return {"grad_norm": float(norm)}

    def lr(self, name):
        engine = self._engines.get(name)
        return engine.get_lr()[0] if engine is not None else None

    def drop_gradients(self):
        # Through the overflow branch: it also clears what ZeRO reduced into its partitions
        # (an engine without pending gradients goes through it unchanged; the restore that
        # follows sets its step counters back anyway).
        for engine in self._engines.values():
            _drop_step(engine)
        self.nonfinite.forget_pending()

    def _lr_schedulers(self):
        return [engine.lr_scheduler for engine in self._engines.values()]

    def base_lr(self, name):
        engine = self._engines.get(name)
        return engine.optimizer.param_groups[0].get("initial_lr") if engine is not None else None

    # -- full weights -----------------------------------------------------------------------
    def gathered(self, name: str):
        engine = self._engines.get(name)
        if engine is None or not engine.zero_optimization_partition_weights():
            return contextlib.nullcontext()
        import deepspeed

        # modifier_rank=None: read-only, every rank sees the full parameters.
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[dict[str, nn.Module]]:
        with super().evaluation() as modules:
            # Under ZeRO-3 every forward of an engine's network is a collective: its hooks
            # fetch and release partitioned weights. Rank 0's sample grids and visuals, or a
            # rank with fewer held-out batches, would then enter collectives the others never
            # do (gloo aborts: "distributed collective mismatch"). Inside the gather every
            # rank holds the full weights: evaluation runs on hook-free views of them.
            modules = {name: self._hook_free(name, module) for name, module in modules.items()}
            low = any(p.dtype in LOW_PRECISION_DTYPES.values() for m in modules.values() for p in m.parameters())
            # Without EMA a network is the engine's bf16 one: samplers feed it fp32 noise.
            with self.autocast() if low else contextlib.nullcontext():
                yield modules

    def _hook_free(self, name: str, module: nn.Module) -> nn.Module:
        engine = self._engines.get(name)
        if engine is None or module is not engine.module or not engine.zero_optimization_partition_weights():
            return module  # EMA copies and untrained networks have no ZeRO hooks
        # Views of the gathered storage (no copy); valid until the gather ends with evaluation().
        return _detached_copy(module, share=True)

    @torch.no_grad()
    def export_state_dicts(self) -> dict[str, dict[str, Any]]:
        """fp32 state_dicts on CPU, full on every rank; bf16/fp16 engines give the fp32 masters."""
        from deepspeed.utils import safe_get_full_fp32_param

        exported = {}
        for name in self.names:
            module = self.unwrap(name)
            with self.gathered(name):
                # Copies: under ZeRO-3 the gathered storage is freed when the gather ends.
                state = {key: _fp32_copy(value.cpu()) for key, value in module.state_dict().items()}
                if name in self._engines and self.section.precision in LOW_PRECISION_DTYPES:
                    for key, param in module.named_parameters():
                        master = safe_get_full_fp32_param(param)  # collective under ZeRO
                        if master is not None:
                            state[key] = _fp32_copy(master.cpu()).reshape(param.shape)
            exported[name] = state
        return exported

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory, rank):
        # Every rank writes its own ZeRO shards (Ray merges the ranks' folders).
        for name, engine in self._engines.items():
            engine.save_checkpoint(directory, tag=name, save_latest=False)
        if rank == 0:
            untrained = {name: m.state_dict() for name, m in self._plain.items() if name not in self._engines}
            torch.save({"ema": self.ema.state_dict(), "untrained": untrained}, os.path.join(directory, EXTRA_FILE))

    @torch.no_grad()
    def portable_state(self):
        """Each engine's optimizer state per parameter name, gathered from the ZeRO partitions
        (a collective: every rank gathers; rank 0's result is written)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        from gentrain.strategies.portable import hyperparameters, named_optimizer_state

        if any(_inner_optimizer(engine) is not None and not _known_wrapper(engine)
               for engine in self._engines.values()):
            return None  # e.g. ZeRO 0 bf16's FP16_UnfusedOptimizer: resumable by the same setup only
        optimizers, schedulers = {}, {}
        for name, engine in self._engines.items():
            schedulers[name] = engine.lr_scheduler.state_dict()
            inner = _inner_optimizer(engine)
            if inner is None:
                optimizers[name] = named_optimizer_state(engine.optimizer, engine.module)
                continue
            keys = _elementwise_keys(engine)
            scalars = _scalar_state(engine, keys)  # per-group values such as Adam's step count
            state = {}
            for key_name, param in engine.module.named_parameters():
                if not param.requires_grad or not keys:
                    continue
                state[key_name] = {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                                   .reshape(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
                                   for key in keys}
                state[key_name].update({key: value.clone() if torch.is_tensor(value) else value
                                        for key, value in scalars.items()})
            optimizers[name] = {"state": state, "param_groups": [
                {**hyperparameters(group), "params": names}
                for group, names in zip(inner.param_groups, self._group_names[name])]}
        return {"optimizers": optimizers, "schedulers": schedulers}

    @torch.no_grad()
    def load_portable(self, directory):
        """Full weights and per-name optimizer state sharded into this world's ZeRO partitions."""
        import deepspeed
        from gentrain.strategies.base import read_portable
        from gentrain.strategies.portable import check_groups, load_named_optimizer_state, with_own_implementation

        weights, portable = read_portable(directory, torch.device("cpu"))
        for name, module in self._plain.items():
            if name not in self._engines:
                module.load_state_dict(weights["networks"][name])
        self.ema.load_state_dict(weights.get("ema", {}))
        for name, engine in self._engines.items():
            full = weights["networks"][name]
            module, saved = engine.module, portable["optimizers"][name]
            params = dict(module.named_parameters())
            if engine.zero_optimization_partition_weights():
                with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                    if torch.distributed.get_rank() == 0:
                        for key, param in params.items():
                            param.data.copy_(full[key].reshape(param.shape))
                for key, buffer in module.named_buffers():
                    buffer.copy_(full[key])
            else:
                module.load_state_dict(full)  # cast to the engine's dtype
            inner = _inner_optimizer(engine)
            if inner is None:
                load_named_optimizer_state(engine.optimizer, module, saved, name)
            else:
                engine.optimizer.refresh_fp32_params()  # the fp32 partitions from the weights above
                for key, param in params.items():
                    if param.requires_grad:  # exact fp32 masters (bf16 engines hold rounded weights)
                        _set_full(param, full[key], None)
                check_groups(self._group_names[name], saved, name)
                if saved["state"]:
                    _ensure_inner_state(engine, next(iter(saved["state"].values())))
                    lazy_link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
                    if lazy_link is not None:  # ZeRO 1-2, bf16: map each parameter's state fragment
                        lazy_link()
                    keys = _elementwise_keys(engine)
                    for key_name, state in saved["state"].items():
                        for key in keys:
                            _set_full(params[key_name], state[key], key)
                    scalars = {key: value for key, value in next(iter(saved["state"].values())).items()
                               if key not in keys}
                    for flat in _flat_partitions(engine):
                        for key, value in scalars.items():
                            inner.state[flat][key] = value.clone() if torch.is_tensor(value) else value
                for group, saved_group in zip(inner.param_groups, saved["param_groups"]):
                    group.update(with_own_implementation(saved_group, group))
            engine.lr_scheduler.load_state_dict(portable["schedulers"][name])

    def load(self, directory):
        for name, engine in self._engines.items():
            path, _ = engine.load_checkpoint(directory, tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise FileNotFoundError(f"{os.path.join(directory, name)}: no DeepSpeed checkpoint of "
                                        f"network {name!r}; resume needs a checkpoint written by "
                                        "strategy.name=deepspeed with the same networks")
        extra_path = os.path.join(directory, EXTRA_FILE)
        if os.path.exists(extra_path):
            extra = torch.load(extra_path, map_location=self.device, weights_only=True)
            for name, state in extra["untrained"].items():
                self._plain[name].load_state_dict(state)
            self.ema.load_state_dict(extra["ema"])


@torch.no_grad()
def _cast_shares(module: nn.Module, dtype: torch.dtype) -> None:
    """A network built under `deepspeed.zero.Init` (in fp32, see construction) cast to the
    engine's dtype share by share, as `deepspeed.initialize` casts a whole network's parameters
    (it leaves partitioned ones as they are): the same values, and buffers stay fp32 as there."""
    for param in module.parameters():
        if hasattr(param, "ds_tensor") and param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)
            param.ds_tensor.data = param.ds_tensor.data.to(dtype)


def _unpartitioned(module: nn.Module) -> None:
    """A network built under `deepspeed.zero.Init` that gets no engine (no optimizer): its
    parameters gathered back into plain, whole ones (no ZeRO hooks would fetch them)."""
    import deepspeed

    for child in module.modules():
        for key, param in list(child._parameters.items()):
            if param is not None and hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param]):
                    whole = param.data.detach().clone()
                child._parameters[key] = nn.Parameter(whole, requires_grad=param.requires_grad)


def _inner_optimizer(engine):
    """The torch optimizer over ZeRO's (or the bf16 optimizer's) flat fp32 partitions; None when
    the engine steps the job type's torch optimizer directly (ZeRO 0 in fp32)."""
    optimizer = engine.optimizer
    return None if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


_FLAT_ATTRIBUTES = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                    "fp32_groups_flat_partition")  # ZeRO-3, ZeRO 1-2, bf16 without ZeRO


def _known_wrapper(engine) -> bool:
    return any(hasattr(engine.optimizer, attribute) for attribute in _FLAT_ATTRIBUTES)


def _flat_partitions(engine) -> list[torch.Tensor]:
    """The fp32 flat partitions the inner optimizer keeps its state for (DeepSpeed 0.19.8:
    ZeRO-3 empties the inner optimizer's param_groups between steps, so they are read here)."""
    optimizer = engine.optimizer
    for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                      "fp32_groups_flat_partition"):  # ZeRO-3, ZeRO 1-2, bf16 without ZeRO
        if hasattr(optimizer, attribute):
            return list(getattr(optimizer, attribute))
    raise ValueError(f"strategy.name=deepspeed: {type(optimizer).__name__} is not an optimizer wrapper "
                     "gentrain knows how to save per parameter; remove optimizer-related keys from "
                     "strategy.deepspeed_config")


def _elementwise_keys(engine) -> list[str]:
    """Optimizer state keys held per element (Adam's moments, SGD's momentum)."""
    inner = _inner_optimizer(engine)
    for flat in _flat_partitions(engine):
        state = inner.state.get(flat)
        if state:
            return [key for key, value in state.items() if torch.is_tensor(value) and value.shape == flat.shape]
    return []


def _scalar_state(engine, keys: list[str]) -> dict:
    """The per-step values of the inner optimizer's state (Adam's step count)."""
    inner = _inner_optimizer(engine)
    for flat in _flat_partitions(engine):
        state = inner.state.get(flat)
        if state:
            return {key: value.detach().cpu().clone() if torch.is_tensor(value) else value
                    for key, value in state.items() if key not in keys}
    return {}


def _ensure_inner_state(engine, example: dict) -> None:
    """Create the inner optimizer's state as its first step would (DeepSpeed creates it
    lazily), shaped like `example` (one parameter's portable state)."""
    inner = _inner_optimizer(engine)
    for flat in _flat_partitions(engine):
        if inner.state.get(flat):
            continue
        inner.state[flat] = {key: torch.zeros_like(flat) if torch.is_tensor(value) and value.dim() > 0
                             else (value.clone() if torch.is_tensor(value) else value)
                             for key, value in example.items()}


def _set_full(param, value: torch.Tensor, key: str | None) -> None:
    """This rank's share of a full fp32 master (key None) or optimizer state of `param`.

    ZeRO-3: written here, not by `safe_set_full_fp32_param`/`safe_set_full_optimizer_state`,
    whose stage-3 path (DeepSpeed 0.19.8, stage3.py `set_full_hp_param`) slices past the end
    of the value on the last rank when the partitions are padded (a 1-element parameter on
    2 ranks: "start (1) + length (1) exceeds dimension size (1)")."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.detach().to(torch.float32).flatten()
    if hasattr(param, "ds_id"):
        if not param.requires_grad:
            return
        optimizer = param._z3_optimizer
        partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                              optim_state_key=key)
        start = partition.numel() * optimizer._get_param_partition_rank(param)
        piece = value[start:start + partition.numel()]
        partition.zero_()
        partition[:piece.numel()].copy_(piece.to(partition.device))
    elif key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def _import_deepspeed(device: torch.device):
    # DeepSpeed picks its accelerator once, at import: CPU workers on a GPU host must say so.
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


# -- dropping an update: DeepSpeed's own overflow path -----------------------------------------
def _check_can_drop(optimizer, policy: str) -> None:
    """Refuse, at set-up, an engine optimizer whose skip path `_drop_step` does not know."""
    if _overflow_kind(optimizer) is None:
        raise ValueError(
            f"train.nonfinite: {policy!r} drops non-finite updates through the overflow branch of "
            f"DeepSpeed's ZeRO 0-3 optimizer wrappers, but DeepSpeed chose {type(optimizer).__name__} "
            "for this network (from strategy.deepspeed_config, e.g. data_types.grad_accum_dtype); "
            "remove that key from strategy.deepspeed_config, or use train.nonfinite=stop")


def _overflow_kind(optimizer) -> str | None:
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return "fp16"  # ZeRO 0 in bf16 or fp16
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch"  # ZeRO 0 in fp32: the job type's own optimizer
    return None


class _Overflowing:
    """Stands in for an FP16 optimizer's overflow checker for one step: 'overflow'."""

    def check(self, *args, **kwargs):
        return True

    def has_overflow(self, *args, **kwargs):
        return True


def _drop_step(engine) -> None:
    """engine.step() at the boundary, made to take DeepSpeed's own fp16-overflow branch: the
    ZeRO optimizers clear their gradient partitions (averaged_gradients, the ipg state,
    micro_step_id) without calling the inner optimizer (Adam's moments and step count stay),
    the engine counts a skipped step and leaves its lr scheduler alone. The decision is the
    guard's, already all-reduced: the overflow check DeepSpeed would run is replaced for this
    one call (instance attributes, removed after), so no collective of its own runs.

    DeepSpeed 0.19.8: stage_1_and_2.py `step` (`if self.check_grad_overflow: self.check_overflow(...)`,
    then `if self.overflow:` clear and return), stage3.py `step` (`_overflow_check_and_loss_scale_update`,
    `_loss_scale_update_and_overflow_cleanup`), unfused_optimizer.py / fused_optimizer.py `step`
    (`overflow_checker` -> `_skip_invalid_grad_norm`), engine.py `_take_model_step`
    (`if overflow: self.skipped_steps += 1` else the lr scheduler steps).
    """
    optimizer = engine.optimizer
    kind = _overflow_kind(optimizer)

    def overflow(*args, **kwargs):
        optimizer.overflow = True
        return True

    patches = {
        "zero12": {"check_grad_overflow": True, "check_overflow": overflow},
        "zero3": {"_overflow_check_and_loss_scale_update": overflow},
        "fp16": {"overflow_checker": _Overflowing()},
        "torch": {"step": lambda *args, **kwargs: None, "overflow": True},
    }[kind]
    shadowed = {key: optimizer.__dict__[key] for key in patches if key in optimizer.__dict__}
    optimizer.__dict__.update(patches)
    try:
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
    finally:
        for key in patches:
            del optimizer.__dict__[key]
        optimizer.__dict__.update(shadowed)


def _local_gradients_bad(engine) -> torch.Tensor:
    """Whether this rank's gradients (its partitions under ZeRO) hold a non-finite value."""
    from deepspeed.utils import safe_get_local_grad

    from gentrain.nonfinite import any_nonfinite

    optimizer = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return any_nonfinite(safe_get_local_grad(p) for p in engine.module.parameters() if p.requires_grad)
    if stage in (1, 2):
        if getattr(optimizer, "cpu_offload", False):  # reduced into the fp32 CPU partitions
            return any_nonfinite(group.grad for group in optimizer.single_partition_of_fp32_groups)
        # This rank's reduced partitions (what DeepSpeed's own overflow check reads).
        return any_nonfinite(grad for grads in optimizer.averaged_gradients.values() for grad in grads or [])
    if getattr(optimizer, "_hp_grad", None) is not None or any(  # BF16_Optimizer: fp32 accumulators
            getattr(p, "_hp_grad", None) is not None for p in engine.module.parameters()):
        from deepspeed.utils import safe_get_full_grad

        return any_nonfinite(safe_get_full_grad(p) for p in engine.module.parameters() if p.requires_grad)
    return any_nonfinite(p.grad for p in engine.module.parameters())  # all-reduced already


def _first_nonfinite_full(engine) -> str | None:
    """The first parameter whose full gradient is not finite: a collective under ZeRO (every
    rank calls it, in the same order, only once a non-finite step was agreed on)."""
    from deepspeed.utils import safe_get_full_grad

    from gentrain.nonfinite import first_nonfinite

    params = [(key, p) for key, p in engine.module.named_parameters() if p.requires_grad]
    return first_nonfinite((key, safe_get_full_grad(p)) for key, p in params)


def _grad_norm(module: nn.Module) -> torch.Tensor:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _detached_copy(module: nn.Module, memo: dict | None = None, share: bool = False) -> nn.Module:
    """An fp32 copy of `module` with its current (gathered) weights, free of DeepSpeed.

    Not copy.deepcopy: that would also copy what ZeRO hangs on parameters (the ZeRO-3
    optimizer itself, fp32 partitions) and keep ZeRO's hooks, which would then try to fetch
    the copy's parameters. Other attributes are shared: they are read, never trained.
    With `share`, tensors are views of the module's own (dtype kept, nothing copied).
    """
    memo = {} if memo is None else memo  # tied weights stay tied
    tensor = (lambda t: t.detach()) if share else _fp32_copy
    # Not copy.copy either: parametrized modules (spectral norm) refuse to be reduced.
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__.update(vars(module))
    clone._parameters = {key: None if p is None else _memo(memo, p, lambda t: nn.Parameter(
        tensor(t), requires_grad=False)) for key, p in module._parameters.items()}
    clone._buffers = {key: None if b is None else _memo(memo, b, tensor)
                      for key, b in module._buffers.items()}
    clone._modules = {key: None if m is None else _detached_copy(m, memo, share)
                      for key, m in module._modules.items()}
    hook_dicts = {key: value for key, value in vars(module).items() if "hooks" in key and isinstance(value, dict)}
    deepspeed_ids = {hook_id for hooks in hook_dicts.values() for hook_id, hook in hooks.items()
                     if _from_deepspeed(hook)}
    for key, hooks in hook_dicts.items():  # companion dicts (with_kwargs) share the hook ids
        clone.__dict__[key] = type(hooks)((i, h) for i, h in hooks.items() if i not in deepspeed_ids)
    return clone


def _memo(memo: dict, tensor: torch.Tensor, make):
    if id(tensor) not in memo:
        memo[id(tensor)] = make(tensor)
    return memo[id(tensor)]


def _fp32_copy(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).clone()


def _from_deepspeed(hook) -> bool:
    func = getattr(hook, "hook", hook)  # torch wraps some hooks
    func = getattr(func, "__func__", func)
    return str(getattr(func, "__module__", "") or "").startswith("deepspeed")
