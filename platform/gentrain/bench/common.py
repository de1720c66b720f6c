"""What every `gentrain bench` shares: publishing a result, a process group of one rank, and
spawned gloo worlds of several."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Callable

import torch


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def publish(result: dict, table: Callable[[dict], str], json_path: str | None,
            log: Callable[[str], None]) -> dict:
    """Print the result's table and write it as JSON (unless json_path is None)."""
    print(table(result), flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        log(f"results written to {json_path}")
    return result


@contextlib.contextmanager
def one_rank_process_group(device_type: str):
    """A torch.distributed group of this process alone (nccl on cuda, gloo on cpu): DeepSpeed
    and Accelerate expect one. An existing group is used as it is."""
    if torch.distributed.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn, world_size: int, args: tuple = (), threads: int = 1, timeout: float = 900.0) -> list:
    """`fn(rank, world_size, *args)` on a gloo process group of `world_size` spawned processes,
    each with `threads` torch threads; returns what each rank returned. `fn` must be defined
    at module level (spawned processes import it by name). A rank's exception raises here
    with that rank's traceback."""
    import multiprocessing
    import queue as queue_module

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_entry, args=(rank, world_size, port, threads, fn, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    outcomes = {}
    try:
        while len(outcomes) < world_size:
            rank, status, payload = results.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            outcomes[rank] = payload
    except queue_module.Empty:
        raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(outcomes))} gave no result "
                           f"within {timeout:g} s") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [outcomes[rank] for rank in range(world_size)]


def _rank_entry(rank, world_size, port, threads, fn, args, results) -> None:
    import traceback

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu",
                       "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def measured_machine(load_before) -> dict:
    """The machine a benchmark ran on and its load average before and after (now)."""
    from gentrain.bench.data import machine_info

    return {**machine_info(), "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg())}


def machine_line(machine: dict) -> str:
    """The table's last line: the CPUs a benchmark had and the load beside it."""
    def load(values) -> str:
        return "/".join(f"{value:.2f}" for value in values)

    return (f"{machine['usable_cpus']} usable CPUs ({machine['cpu_model']}); load average "
            f"{load(machine['load_average_before'])} before, {load(machine['load_average_after'])} after")
