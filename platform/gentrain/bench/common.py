"""What every `gentrain bench` shares: publishing a result, and a process group of one rank."""

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
