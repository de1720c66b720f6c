"""The harness itself: a real gloo all-reduce across 2 processes."""

import torch

from harness import run_world


def _all_reduce_rank(rank: int, world_size: int) -> float:
    value = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(value)
    return float(value)


def test_two_processes_all_reduce():
    assert run_world(_all_reduce_rank, world_size=2) == [3.0, 3.0]
