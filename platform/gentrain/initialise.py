"""Changing a network's parameters after the module holding them was made, in a way that
also holds when the network is built sharded (ZeRO-3's `deepspeed.zero.Init`, see
`Supports.sharded_build`).

Under `zero.Init` each module's own parameters are partitioned over the ranks as soon as its
`__init__` returns: a parent that then zero-initialises a child's layer, or re-draws weights,
would write into an empty tensor and be lost silently. Wrapping such a write in
`whole_parameters` gathers just those parameters while it runs (the peak stays one layer,
never the whole model) and partitions them again with the values written; without DeepSpeed
it does nothing, so a family's code runs as before (DeepSpeed is imported only when a
parameter is partitioned).

    with whole_parameters(self.out.parameters()):
        nn.init.zeros_(self.out.weight)

    initialise_parameters(model, lambda name, parameter: nn.init.normal_(parameter, 0.0, 0.02))

The values are those of a whole build: every rank makes the same seeded draws in the same
order, and rank 0's result is the one kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


def is_partitioned(parameter: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: DeepSpeed has taken it over (`ds_id`), its data may be a shard."""
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def whole_parameters(parameters: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block the parameters hold their whole values on every rank, writable; on
    leaving, rank 0's values are kept and partitioned again. Plain parameters: nothing done."""
    partitioned = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not partitioned:
        yield
        return
    import deepspeed  # only reached when DeepSpeed partitioned the parameters: it is installed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def initialise_parameters(root: nn.Module, initialise: Callable[[str, nn.Parameter], None]) -> None:
    """`initialise(name, parameter)` for every parameter of `root` in `root.named_parameters()`
    order (a shared parameter once, under its first name), so the random draws are those of
    a loop over named_parameters; one module's own parameters are gathered at a time."""
    seen: set[int] = set()
    for prefix, module in root.named_modules():
        own = [(name, parameter) for name, parameter in module.named_parameters(recurse=False)
               if id(parameter) not in seen]
        if not own:
            continue
        seen.update(id(parameter) for _, parameter in own)
        with whole_parameters([parameter for _, parameter in own]):
            for name, parameter in own:
                initialise(f"{prefix}.{name}" if prefix else name, parameter)
