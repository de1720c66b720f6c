"""Data-parallel scaling on this machine: 1 worker against 2, threads per worker set fairly.

    gentrain bench scaling                                   # the CIFAR-10 UNet, batch 8 per worker
    gentrain bench scaling --model transformer-debug --steps 20 --rounds 3

Each configuration is a gloo world of spawned processes, each rank running the real job's
optimizer step through gentrain's Engine (ddp, fp32, synthetic batches; the models of
`gentrain bench mfu`), batch `batch_size` per worker, `steps` timed steps after `warmup`
between two barriers:

- 1 worker x 1 thread: what one gentrain worker gets by default. gentrain asks Ray Train
  for `scaling.resources_per_worker` (default CPU: 1) and Ray sets OMP_NUM_THREADS to the
  CPUs a worker holds, so torch runs 1 intra-op thread per worker;
- 2 workers x 1 thread: twice the hardware, the same threads per worker; the scaling
  ratio is its samples/s over the line above (ideal 2.0x);
- 1 worker x 2 threads: one worker with the whole 2-core machine; to give a single
  worker every core, set `scaling.resources_per_worker: {CPU: N}` (Ray then sets
  OMP_NUM_THREADS=N). Fair: threads per worker = usable CPUs / workers.

Configurations alternate within each round, so a change in the machine's load hits all
of them; the table shows each round's ratios and the median.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from gentrain.bench.common import machine_line, measured_machine, publish, run_ranks, timestamp
from gentrain.bench.mfu import MODELS, build_engine, synthetic_batches

CONFIGURATIONS = (("1 worker x 1 thread", 1, 1), ("2 workers x 1 thread", 2, 1), ("1 worker x 2 threads", 1, 2))


def run_scaling_bench(model: str = "diffusion-cifar10", batch_size: int = 8, steps: int = 4, warmup: int = 2,
                      rounds: int = 1, json_path: str | None = "bench-scaling.json") -> dict:
    if model not in MODELS:
        raise SystemExit(f"bench scaling: unknown model {model!r}; known: {', '.join(MODELS)}")
    load_before = os.getloadavg()
    rows = []
    for round_index in range(rounds):
        for label, workers, threads in CONFIGURATIONS:
            seconds = max(run_ranks(_train_rank, workers, (model, batch_size, steps, warmup), threads=threads))
            row = {"round": round_index, "configuration": label, "workers": workers, "threads_per_worker": threads,
                   "seconds": seconds, "steps_per_s": steps / seconds,
                   "samples_per_s": steps * batch_size * workers / seconds}
            rows.append(row)
            _log(f"round {round_index + 1}/{rounds} {label}: {row['steps_per_s']:.3f} steps/s, "
                 f"{row['samples_per_s']:.2f} samples/s")
    result = {
        "benchmark": "scaling",
        "command": f"gentrain bench scaling --model {model} --batch-size {batch_size} --steps {steps} "
                   f"--rounds {rounds}",
        "timestamp": timestamp(),
        "machine": measured_machine(load_before),
        "settings": {"model": model, "spec": MODELS[model].spec, "batch_size_per_worker": batch_size,
                     "steps": steps, "warmup": warmup, "rounds": rounds, "strategy": "ddp", "backend": "gloo",
                     "precision": "fp32"},
        "rows": rows,
        "ratios": _ratios(rows, rounds),
    }
    return publish(result, format_table, json_path, _log)


def _train_rank(rank: int, world_size: int, model: str, batch_size: int, steps: int, warmup: int) -> float:
    """One rank: warm-up steps, then the timed steps between barriers; returns their seconds."""
    bench_model = MODELS[model]
    engine, _ = build_engine(bench_model, torch.device("cpu"), rank=rank, world_size=world_size,
                             extra_overrides=(f"train.batch_size={batch_size}",))
    batches = synthetic_batches(bench_model.data_info, batch_size, torch.device("cpu"))
    for _ in range(warmup):
        engine.optimizer_step(batches)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        engine.optimizer_step(batches)
    torch.distributed.barrier()
    return time.perf_counter() - start


def _ratios(rows: list[dict], rounds: int) -> dict:
    per_round = []
    for round_index in range(rounds):
        rates = {row["configuration"]: row["samples_per_s"] for row in rows if row["round"] == round_index}
        one, two, whole = (rates[label] for label, _, _ in CONFIGURATIONS)
        per_round.append({"two_workers_over_one": two / one, "two_workers_over_one_with_all_threads": two / whole,
                          "two_threads_over_one": whole / one})
    return {"per_round": per_round,
            "median": {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}}


def format_table(result: dict) -> str:
    lines = [f"{'configuration':<22} {'round':>5} {'steps/s':>8} {'samples/s':>10}"]
    for row in result["rows"]:
        lines.append(f"{row['configuration']:<22} {row['round'] + 1:>5} {row['steps_per_s']:>8.3f} "
                     f"{row['samples_per_s']:>10.2f}")
    median = result["ratios"]["median"]
    settings, machine = result["settings"], result["machine"]
    lines.append(f"2 workers / 1 worker, 1 thread each (scaling, ideal 2.0x): {median['two_workers_over_one']:.2f}x")
    lines.append(f"2 workers x 1 thread / 1 worker x 2 threads (same cores): "
                 f"{median['two_workers_over_one_with_all_threads']:.2f}x")
    lines.append(f"1 worker, 2 threads / 1 thread: {median['two_threads_over_one']:.2f}x")
    lines.append(f"{settings['model']} ({settings['spec']}), batch {settings['batch_size_per_worker']} per worker, "
                 f"{settings['steps']} timed steps, median of {settings['rounds']} round(s); " +
                 machine_line(machine))
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"[bench scaling] {message}", flush=True)
