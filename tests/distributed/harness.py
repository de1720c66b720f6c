"""Run a function on a real gloo process group of N CPU processes (no Ray needed).

    results = run_world(my_module_level_fn, world_size=2, args=(spec_dict,))

`fn(rank, world_size, *args)` must be defined at module level (processes are spawned,
so it is imported by name); it returns something picklable, collected per rank.
Each rank is seeded, runs in its own process with `DS_ACCELERATOR=cpu`, and an exception
in any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, results):
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu",
    })
    torch.set_num_threads(1)
    torch.manual_seed(1234 + rank)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_world(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0) -> list:
    context = mp.get_context("spawn")
    manager = context.Manager()
    results = manager.dict()
    port = free_port()
    processes = [context.Process(target=_entry, args=(rank, world_size, port, fn, args, results))
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
