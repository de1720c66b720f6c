"""Run a function on a real process group of N processes (no Ray needed).

    results = run_world(my_module_level_fn, world_size=2, args=(spec_dict,))
    results = run_world(fn, world_size=1, backend="nccl")  # GPU ranks, one per device

`fn(rank, world_size, *args)` must be defined at module level (processes are spawned,
so it is imported by name); it returns something picklable, collected per rank.
Each rank is seeded and runs in its own process; gloo ranks get `DS_ACCELERATOR=cpu`,
nccl ranks their own CUDA device and `DS_ACCELERATOR=cuda`. An exception in any rank
fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp
from ports import free_port


def _entry(rank: int, world_size: int, port: int, fn, args, results, backend: str):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "DS_ACCELERATOR": "cuda" if backend == "nccl" else "cpu",
    })
    torch.set_num_threads(1)
    torch.manual_seed(1234 + rank)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_world(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0,
              backend: str = "gloo") -> list:
    context = mp.get_context("spawn")
    manager = context.Manager()
    results = manager.dict()
    port = free_port()
    processes = [context.Process(target=_entry, args=(rank, world_size, port, fn, args, results, backend))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
    errors = [f"rank {rank}:\n{results[rank][1]}" for rank in range(world_size)
              if rank in results and results[rank][0] == "error"]
    missing = [rank for rank in range(world_size) if rank not in results]
    if errors or missing:
        raise AssertionError("\n".join(errors) + (f"\nranks without a result: {missing}" if missing else ""))
    return [results[rank][1] for rank in range(world_size)]
