"""The strategy-neutral training state: optimizer state per parameter name, on CPU.

    portable_state.pt = {"optimizers": {network: {"state": {param name: {key: tensor}},
                                                  "param_groups": [{hyperparameters, "params": [names]}]}},
                         "schedulers": {network: lr scheduler state_dict}}

Beside model.pt (full fp32 weights and EMA of every network) it is everything a run needs
to continue on another world size or strategy: each strategy writes it from its own layout
(DDP/Accelerate: the torch optimizer's state_dict renamed; DeepSpeed: its ZeRO partitions
gathered per parameter, `deepspeed.utils.safe_get_full_optimizer_state`) and reads it into
its own (sharding it again under ZeRO). Same world and strategy resume from the
strategy's own files, as before.
"""

from __future__ import annotations

import torch
from torch import nn

PORTABLE_FILE = "portable_state.pt"
# How torch runs an update, not what it computes (train.optimizer.implementation): a loaded
# checkpoint's groups keep the running optimizer's own choice.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def with_own_implementation(saved_group: dict, own_group: dict) -> dict:
    """A checkpoint's hyperparameters of one group (no "params"), with `own_group`'s
    implementation switches: a run written fused continues under the implementation this
    run chose, and the other way round."""
    values = {key: value for key, value in saved_group.items() if key != "params"}
    values.update({key: own_group[key] for key in IMPLEMENTATION_KEYS if key in own_group})
    return values


def parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in `module` (shared parameters: the first name)."""
    return {id(p): name for name, p in module.named_parameters()}


def _cpu(value):
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def hyperparameters(group: dict) -> dict:
    return {key: _cpu(value) for key, value in group.items() if key != "params"}


def named_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict:
    """A torch optimizer's state_dict keyed by `module`'s parameter names."""
    names = parameter_names(module)
    order = [_name(names, p, module) for group in optimizer.param_groups for p in group["params"]]
    state_dict = optimizer.state_dict()
    return {
        "state": {order[index]: {key: _cpu(value) for key, value in state.items()}
                  for index, state in state_dict["state"].items()},
        "param_groups": [{**hyperparameters(group), "params": [order[i] for i in group["params"]]}
                         for group in state_dict["param_groups"]],
    }


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module, portable: dict,
                               network: str) -> None:
    """Restore what `named_optimizer_state` (or another strategy's equivalent) wrote."""
    names = parameter_names(module)
    groups = [[_name(names, p, module) for p in group["params"]] for group in optimizer.param_groups]
    check_groups(groups, portable, network)
    index = {name: i for i, name in enumerate(n for group in groups for n in group)}
    device_state = {index[name]: dict(state) for name, state in portable["state"].items()}
    optimizer.load_state_dict({
        "state": device_state,
        "param_groups": [{**with_own_implementation(saved, own), "params": [index[n] for n in ours]}
                         for saved, own, ours in zip(portable["param_groups"], optimizer.param_groups, groups)],
    })


def check_groups(groups: list[list[str]], portable: dict, network: str) -> None:
    saved = [list(group["params"]) for group in portable["param_groups"]]
    if [sorted(g) for g in saved] != [sorted(g) for g in groups]:
        raise ValueError(
            f"network {network!r}: the checkpoint's optimizer holds parameter groups {_show(saved)}, this "
            f"run's optimizer {_show(groups)}; continue with the job type and job.* settings that wrote it")


def _name(names: dict[int, str], param, module) -> str:
    try:
        return names[id(param)]
    except KeyError:
        raise ValueError(f"an optimizer of {type(module).__name__} holds a parameter that is not one of "
                         "the network's own: its state cannot be saved by name") from None


def _show(groups: list[list[str]]) -> str:
    shown = [g[:3] + (["..."] if len(g) > 3 else []) for g in groups]
    return f"{len(groups)} group(s) {shown}"
