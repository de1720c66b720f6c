"""Model FLOPs utilisation (MFU) of the UNet and the transformer, on this machine.

    gentrain bench mfu                                   # debug and real sizes; bench-mfu.json
    gentrain bench mfu --models diffusion-debug --seconds 2

For each model the real job's training step runs through gentrain's Engine in this process
(one rank, ddp, fp32, no Ray; synthetic batches of the spec's shape):

- FLOPs per step are counted, not guessed: one whole optimizer step (forward, backward,
  optimizer) runs under `torch.utils.flop_counter.FlopCounterMode`, which counts the
  matmuls, convolutions and attention the step dispatches (elementwise work is not
  counted, as in every MFU convention; torch's formulas for the CUDA attention kernels
  are registered for the CPU ones, which it does not count: the full score matrix, as
  torch counts causal attention on a GPU);
- the step time is the mean over the timed steps that follow `warmup` steps, run for at
  least `seconds` (and at least 2 steps); the median step is reported beside it (MFU@med),
  since on a shared machine a descheduled step moves the mean and not the median. With
  more than one torch thread a step waits for its slowest thread, so a busy machine
  hurts 2 threads far more than 1 (`--threads 1`);
- the peak is this machine's own, measured in the same run with the same threads: a loop
  of square fp32 `torch.matmul` (2 n^3 FLOPs each), best of 3 windows, once before the
  models and once after; MFU divides by the higher of the two.

MFU = (FLOPs per step / seconds per step) / peak FLOPs/s. On a shared machine the load
(`uptime`, recorded before and after) moves both the peak and the steps: read MFU, not
the absolute rates.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from gentrain.bench.common import machine_line, measured_machine, publish, timestamp
from gentrain.registry import DataInfo

# One micro-batch per optimizer step (gpt2-small accumulates 4): a step is one batch.
REAL_OVERRIDES = ["strategy.precision=fp32", "scaling.use_gpu=false", "scaling.num_workers=1", "train.grad_accum=1"]


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One row: a bundled spec, the data it is shaped for, the batch per step."""

    spec: str
    data_info: DataInfo
    batch_size: int | None = None  # None: the spec's train.batch_size
    overrides: tuple[str, ...] = ()
    note: str = ""


MODELS = {
    "diffusion-debug": BenchModel("diffusion/debug", DataInfo((1, 8, 8), 10)),
    # The DDPM CIFAR-10 UNet (35.7M parameters) at a CPU-sized batch.
    "diffusion-cifar10": BenchModel("diffusion/cifar10", DataInfo((3, 32, 32), 10), batch_size=4,
                                    overrides=("job.config.dropout=0.0",), note="batch 4 (spec: 32)"),
    "transformer-debug": BenchModel("transformer/debug", DataInfo((128,), kind="tokens", vocab_size=256)),
    # GPT-2 small's network on bytes (86M parameters) at a CPU-sized context and batch.
    "transformer-gpt2-small": BenchModel("transformer/gpt2-small", DataInfo((256,), kind="tokens", vocab_size=256),
                                         batch_size=2, overrides=("job.config.dropout=0.0",),
                                         note="256 tokens x batch 2 (spec: 1024 x 16)"),
}
DEFAULT_MODELS = tuple(MODELS)


def run_mfu_bench(models: tuple[str, ...] = DEFAULT_MODELS, seconds: float = 3.0, warmup: int = 5,
                  json_path: str | None = "bench-mfu.json", matmul_size: int = 2048,
                  threads: int | None = None, peak_window_seconds: float = 0.5) -> dict:
    """`threads`: torch's intra-op threads for the peak and the models (default: torch's own,
    which is the usable CPUs unless OMP_NUM_THREADS says otherwise)."""
    if threads is not None:
        torch.set_num_threads(threads)
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise SystemExit(f"bench mfu: unknown model {', '.join(unknown)}; known: {', '.join(MODELS)}")
    load_before = os.getloadavg()
    device = torch.device("cpu")
    peak_before = matmul_peak(matmul_size, window_seconds=peak_window_seconds)
    _log(f"matmul peak {peak_before / 1e9:.1f} GFLOP/s (fp32, n={matmul_size}, {torch.get_num_threads()} threads)")
    rows = []
    for name in models:
        row = {"model": name, **measure_model(MODELS[name], seconds, warmup, device)}
        row["achieved_flops_per_s"] = row["flops_per_step"] / row["seconds_per_step"]
        row["median_flops_per_s"] = row["flops_per_step"] / row["median_seconds_per_step"]
        rows.append(row)
        _log(f"{name}: {row['flops_per_step'] / 1e9:.2f} GFLOP/step, {row['seconds_per_step'] * 1e3:.1f} ms/step "
             f"(median {row['median_seconds_per_step'] * 1e3:.1f}), "
             f"{row['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s")
    peak_after = matmul_peak(matmul_size, window_seconds=peak_window_seconds)
    peak = max(peak_before, peak_after)
    for row in rows:
        row["mfu"] = row["achieved_flops_per_s"] / peak
        row["median_step_mfu"] = row["median_flops_per_s"] / peak
    machine = measured_machine(load_before)
    result = {
        "benchmark": "mfu",
        "command": f"gentrain bench mfu --models {','.join(models)} --seconds {seconds:g}"
                   + (f" --threads {threads}" if threads is not None else ""),
        "timestamp": timestamp(),
        "machine": machine,
        "settings": {"device": device.type, "threads": torch.get_num_threads(), "warmup": warmup,
                     "min_seconds": seconds, "strategy": "ddp", "precision": "fp32", "world_size": 1,
                     "matmul_size": matmul_size},
        "peak_flops_per_s": {"before": peak_before, "after": peak_after, "used": peak},
        "rows": rows,
    }
    return publish(result, format_table, json_path, _log)


def matmul_peak(n: int = 2048, windows: int = 3, window_seconds: float = 0.5) -> float:
    """This machine's fp32 matmul FLOPs/s with torch's current threads: the best window."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)  # warm-up: the first call allocates and picks kernels
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while True:
            torch.matmul(a, b, out=out)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= window_seconds:
                break
        best = max(best, 2 * n ** 3 * count / elapsed)
    return best


def measure_model(model: BenchModel, seconds: float, warmup: int, device: torch.device,
                  threads: int | None = None) -> dict:
    """Counted FLOPs of one optimizer step of the model's job, and its mean step time."""
    engine, batch_size = build_engine(model, device)
    batches = synthetic_batches(model.data_info, batch_size, device)
    params = parameter_count(engine)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        engine.optimizer_step(batches)  # also the first warm-up step
    flops = counter.get_total_flops()
    for _ in range(warmup):
        engine.optimizer_step(batches)
    times, start = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        engine.optimizer_step(batches)
        times.append(time.perf_counter() - began)
    mean = sum(times) / len(times)
    return {"spec": model.spec, "note": model.note, "batch_size": batch_size, "parameters": params,
            "flops_per_step": flops, "timed_steps": len(times), "seconds_per_step": mean,
            "median_seconds_per_step": statistics.median(times), "samples_per_s": batch_size / mean,
            "threads": threads or torch.get_num_threads()}


def cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU kernels of `scaled_dot_product_attention`, which torch's
    counter does not know (it counts the CUDA ones): the same formulas as torch's CUDA
    attention, so the whole score matrix counts, causal or not."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is not None:
        mapping[forward] = lambda query, key, value, *args, out_shape=None, **kwargs: \
            flop_counter.sdpa_flop_count(query, key, value)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None:
        mapping[backward] = lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: \
            flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
    return mapping


def build_engine(model: BenchModel, device: torch.device, rank: int = 0, world_size: int = 1,
                 extra_overrides: tuple[str, ...] = ()):
    """The job's Engine at the model's size (fp32 ddp on the CPU); returns it and the batch size."""
    from gentrain.engine import Engine
    from gentrain.validation import load_spec

    overrides = [*REAL_OVERRIDES, *model.overrides, "tracking.enabled=false", *extra_overrides]
    if model.batch_size is not None:
        overrides.append(f"train.batch_size={model.batch_size}")
    spec = load_spec(model.spec, overrides)
    engine = Engine(spec, rank=rank, world_size=world_size, device=device, data_info=model.data_info,
                    print_fn=None)
    return engine, spec.train.batch_size


def parameter_count(engine) -> int:
    """Parameters of every network the job trains (ZeRO-3 partitions report their full size)."""
    total = 0
    for name in engine.strategy.names:
        for parameter in engine.strategy.unwrap(name).parameters():
            total += getattr(parameter, "ds_numel", parameter.numel())
    return total


def synthetic_batches(data_info: DataInfo, batch_size: int, device: torch.device):
    """An endless stream of a few fixed random batches of the data's kind (what the data
    pipeline yields: images in [0, 1] with labels, or int64 tokens)."""
    generator = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(4):
        if data_info.kind == "tokens":
            batch = {"tokens": torch.randint(0, data_info.vocab_size, (batch_size, *data_info.shape),
                                             generator=generator)}
        else:
            batch = {"image": torch.rand(batch_size, *data_info.shape, generator=generator),
                     "label": torch.randint(0, max(data_info.num_classes, 1), (batch_size,), generator=generator)}
        pool.append({key: value.to(device) for key, value in batch.items()})
    step = 0
    while True:
        yield pool[step % len(pool)]
        step += 1


def format_table(result: dict) -> str:
    lines = [f"{'model':<24} {'params':>8} {'batch':>5} {'GFLOP/step':>10} {'ms/step':>8} {'median':>8} "
             f"{'GFLOP/s':>8} {'MFU':>6} {'MFU@med':>7}  note"]
    for row in result["rows"]:
        params = f"{row['parameters'] / 1e6:.2f}M"
        lines.append(f"{row['model']:<24} {params:>8} {row['batch_size']:>5} {row['flops_per_step'] / 1e9:>10.3f} "
                     f"{row['seconds_per_step'] * 1e3:>8.1f} {row['median_seconds_per_step'] * 1e3:>8.1f} "
                     f"{row['achieved_flops_per_s'] / 1e9:>8.2f} {row['mfu'] * 100:>5.1f}% "
                     f"{row['median_step_mfu'] * 100:>6.1f}%  {row['note']}")
    peak, machine = result["peak_flops_per_s"], result["machine"]
    lines.append(f"MFU: mean step time; MFU@med: median step time (a step preempted on a busy machine "
                 f"moves the mean, not the median)")
    lines.append(f"peak: fp32 matmul n={result['settings']['matmul_size']}, {peak['before'] / 1e9:.1f} GFLOP/s "
                 f"before, {peak['after'] / 1e9:.1f} after (MFU uses the higher); {result['settings']['threads']} "
                 f"torch threads on " + machine_line(machine))
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"[bench mfu] {message}", flush=True)
