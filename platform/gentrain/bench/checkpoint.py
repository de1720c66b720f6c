"""Checkpoint save and restore seconds against model size, per strategy.

    gentrain bench checkpoint                                  # ddp, ZeRO-2, ZeRO-3; 3 sizes; 2 ranks
    gentrain bench checkpoint --sizes 256x2,1024x8 --strategies ddp --world-size 1

Each strategy runs in its own gloo world of spawned processes (no Ray). For each size, a
transformer of that width x depth (the transformer/debug spec otherwise, fp32) is built
through gentrain's Engine and takes one optimizer step, so the optimizer state exists;
then, between barriers, every rank times

- save: `Engine.save` into a fresh folder on local disk, as a run does every
  checkpoint.every steps: every rank's share (DeepSpeed's shards or ddp's replica), the
  portable optimizer state, model.pt and the metadata with every file's sha256;
- restore: `Engine.restore` of that folder (the manifest's hashes verified first, as a
  resume does);
- under checkpoint.asynchronous (strategies that allow it: not DeepSpeed), the same
  checkpoint written in the background (`Engine.save_in_background`, as `fit` does):
  *blocked*, the seconds the training loop waits (the host copy of the state; no write
  is in flight before it), and *total*, until the folder is complete with its manifest,
  with the loop idle; *loop cost*: the seconds that enough steps to cover the write took
  with the write in flight beyond as many steps without one, timed alternately three
  times (the median difference): what the loop really loses, blocked time included, as
  the background write shares the CPU with training.

A synchronous save blocks the loop for all of its seconds. The reported seconds are the
slowest rank's; the bytes are the folder's total on disk.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time

import torch

from gentrain.bench.common import machine_line, measured_machine, publish, run_ranks, timestamp
from gentrain.bench.mfu import MODELS, build_engine, parameter_count, synthetic_batches
from gentrain.engine import from_rank_zero

STRATEGIES = {
    "ddp": ("strategy.name=ddp",),
    "deepspeed-zero2": ("strategy.name=deepspeed", "strategy.zero_stage=2"),
    "deepspeed-zero3": ("strategy.name=deepspeed", "strategy.zero_stage=3"),
}
DEFAULT_SIZES = ((256, 2), (512, 4), (768, 4))  # d_model x layers: about 1.6M, 12.7M, 28.5M parameters
ASYNC_FIELDS = ("async_blocked_s", "async_total_s", "async_training_total_s", "async_loop_cost_s", "overlapped_steps")


def run_checkpoint_bench(sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
                         strategies: tuple[str, ...] = tuple(STRATEGIES), world_size: int = 2,
                         folder: str | None = None, json_path: str | None = "bench-checkpoint.json") -> dict:
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown:
        raise SystemExit(f"bench checkpoint: unknown strategy {', '.join(unknown)}; known: {', '.join(STRATEGIES)}")
    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="gentrain-bench-checkpoint-", dir=folder)
    rows = []
    try:
        for strategy in strategies:
            per_rank = run_ranks(_checkpoint_rank, world_size, (strategy, sizes, work))
            for index, (width, layers) in enumerate(sizes):
                ranks = [results[index] for results in per_rank]
                row = {"strategy": strategy, "d_model": width, "layers": layers,
                       "parameters": ranks[0]["parameters"], "bytes": ranks[0]["bytes"],
                       "save_s": max(r["save_s"] for r in ranks), "restore_s": max(r["restore_s"] for r in ranks),
                       "step_s": max(r["step_s"] for r in ranks)}
                for key in ASYNC_FIELDS:
                    row[key] = None if ranks[0][key] is None else max(r[key] for r in ranks)
                rows.append(row)
                background = "" if row["async_blocked_s"] is None else (
                    f"; asynchronous: blocked {row['async_blocked_s']:.2f} s, total {row['async_total_s']:.2f} s, "
                    f"loop cost while training {row['async_loop_cost_s']:.2f} s")
                _log(f"{strategy} {width}x{layers} ({row['parameters'] / 1e6:.1f}M parameters, "
                     f"{row['bytes'] / 2**20:.0f} MiB): save {row['save_s']:.2f} s, restore {row['restore_s']:.2f} s"
                     f"{background}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "checkpoint",
        "command": f"gentrain bench checkpoint --sizes {','.join(f'{w}x{l}' for w, l in sizes)} "
                   f"--strategies {','.join(strategies)} --world-size {world_size}",
        "timestamp": timestamp(),
        "machine": measured_machine(load_before),
        "settings": {"model": "transformer/debug at each d_model x layers", "world_size": world_size,
                     "backend": "gloo", "precision": "fp32", "disk": "a temporary folder on local disk"},
        "rows": rows,
    }
    return publish(result, format_table, json_path, _log)


def _checkpoint_rank(rank: int, world_size: int, strategy: str, sizes, work: str) -> list[dict]:
    model = MODELS["transformer-debug"]
    device = torch.device("cpu")
    background = not strategy.startswith("deepspeed")  # checkpoint.asynchronous is refused there
    results = []
    for width, layers in sizes:
        overrides = (*STRATEGIES[strategy], f"job.config.d_model={width}", f"job.config.layers={layers}",
                     f"storage_path={work}", f"checkpoint.asynchronous={str(background).lower()}")
        engine, batch_size = build_engine(model, device, rank=rank, world_size=world_size, extra_overrides=overrides)
        batches = synthetic_batches(model.data_info, batch_size, device)
        engine.optimizer_step(batches)
        step_s = _timed(lambda: [engine.optimizer_step(batches) for _ in range(2)]) / 2
        directory = os.path.join(work, f"{strategy}-{width}x{layers}")
        save_s = _timed(lambda: engine.save(directory))
        size = _folder_bytes(directory)
        restore_s = _timed(lambda: engine.restore(directory))
        result = {"parameters": parameter_count(engine), "bytes": size, "save_s": save_s, "restore_s": restore_s,
                  "step_s": step_s, **dict.fromkeys(ASYNC_FIELDS)}
        if background:
            result.update(_background_save(engine, batches, directory, step_s))
        results.append(result)
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
        del engine
    return results


def _background_save(engine, batches, directory: str, step_s: float, rounds: int = 3) -> dict:
    """The asynchronous columns (see the module docstring); every rank alike."""
    def save_into(folder: str) -> None:
        engine.save_in_background(lambda snapshot: snapshot.write(folder))

    torch.distributed.barrier()
    start = time.perf_counter()
    save_into(directory + "-idle")
    blocked = time.perf_counter() - start
    engine.wait_for_checkpoint()
    torch.distributed.barrier()
    total = time.perf_counter() - start
    # Enough steps to cover the write (rank 0's count: the steps are collectives), timed
    # with and without a write in flight, alternately: the median of the differences.
    steps = from_rank_zero(max(1, math.ceil(total / step_s)), engine.world_size)
    costs, with_write = [], []
    for _ in range(rounds):
        without = _timed(lambda: [engine.optimizer_step(batches) for _ in range(steps)])

        def steps_during_a_write():
            save_into(directory + "-training")
            for _ in range(steps):
                engine.optimizer_step(batches)
            engine.wait_for_checkpoint()

        with_write.append(_timed(steps_during_a_write))
        costs.append(with_write[-1] - without)
    if engine.rank == 0:
        for suffix in ("-idle", "-training"):
            shutil.rmtree(directory + suffix, ignore_errors=True)
    return {"async_blocked_s": blocked, "async_total_s": total, "async_training_total_s": statistics.median(with_write),
            "async_loop_cost_s": statistics.median(costs), "overlapped_steps": steps}


def _timed(action) -> float:
    torch.distributed.barrier()
    start = time.perf_counter()
    action()
    torch.distributed.barrier()
    return time.perf_counter() - start


def _folder_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def format_table(result: dict) -> str:
    lines = [f"{'strategy':<16} {'d_model x layers':>16} {'params':>8} {'on disk':>9} {'step s':>7} {'save s':>7} "
             f"{'restore s':>9} {'async blocked s':>15} {'async total s':>13} {'loop cost s':>11}"]
    for row in result["rows"]:
        background = ("-", "-", "-") if row.get("async_blocked_s") is None else (
            f"{row['async_blocked_s']:.2f}", f"{row['async_total_s']:.2f}", f"{row['async_loop_cost_s']:.2f}")
        lines.append(f"{row['strategy']:<16} {row['d_model']:>9}x{row['layers']:<6} {row['parameters'] / 1e6:>7.1f}M "
                     f"{row['bytes'] / 2**20:>6.0f}MiB {row.get('step_s', 0):>7.2f} {row['save_s']:>7.2f} "
                     f"{row['restore_s']:>9.2f} {background[0]:>15} {background[1]:>13} {background[2]:>11}")
    machine = result["machine"]
    lines.append(f"{result['settings']['world_size']} gloo ranks, the slowest rank's seconds; a synchronous save "
                 "blocks the loop for all its seconds; " + machine_line(machine))
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"[bench checkpoint] {message}", flush=True)
