"""Peak GPU memory of one training step under each strategy: what ZeRO and offload buy.

    gentrain bench memory                       # ~0.8B-parameter MLP, bf16, one GPU
    gentrain bench memory --width 4096 --layers 8 --json bench-memory.json

A stack of `layers` square Linear layers (width x width, GELU between) trains with AdamW
for a few steps under: a plain PyTorch loop (fp32 weights, bf16 autocast), ddp, and
DeepSpeed ZeRO 2 and 3 with and without CPU offload (bf16 engines, fp32 masters). Each
row runs in a fresh process on one rank (nccl), so one row's allocations never count
towards another's; the table shows the peak of `torch.cuda.max_memory_allocated` over the
steps, the mean step time after the first, and parameters/optimizer state per byte.

On one GPU ZeRO has nobody to shard with: the saving on one device comes from bf16
engines (half-size weights and gradients) and offload (Adam's moments and the fp32
masters, and for ZeRO 3 the parameters, in CPU memory). With N GPUs ZeRO divides the
sharded part by N on top.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import platform
import time

import torch
from torch import nn

from gentrain.bench.common import one_rank_process_group, publish, timestamp

ROWS = {  # label: (strategy section or None for plain PyTorch, precision)
    "plain pytorch": (None, "bf16"),
    "ddp": ({"name": "ddp"}, "bf16"),
    "zero2": ({"name": "deepspeed", "zero_stage": 2}, "bf16"),
    "zero2 + offload optimizer": ({"name": "deepspeed", "zero_stage": 2, "offload_optimizer": True}, "bf16"),
    "zero3": ({"name": "deepspeed", "zero_stage": 3}, "bf16"),
    "zero3 + offload optimizer, params": ({"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                                           "offload_param": True}, "bf16"),
}
STEPS = 4
BATCH = 16


def run_memory_bench(width: int = 8192, layers: int = 12, json_path: str | None = "bench-memory.json") -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench memory measures GPU memory: torch sees no CUDA device")
    params = layers * (width * width + width)
    rows = []
    context = multiprocessing.get_context("spawn")
    for label, (section, precision) in ROWS.items():
        with context.Pool(1) as pool:  # a fresh process: a clean allocator per row
            row = pool.apply(_measure, (label, section, precision, width, layers))
        rows.append(row)
        outcome = row.get("error") or f"{row['peak_gib']:.2f} GiB peak, {row['step_s']:.3f} s/step"
        _log(f"{label:<36} {outcome}")
    result = {
        "benchmark": "memory",
        "command": f"gentrain bench memory --width {width} --layers {layers}",
        "timestamp": timestamp(),
        "machine": {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "settings": {"width": width, "layers": layers, "parameters": params, "batch_size": BATCH,
                     "steps": STEPS, "optimizer": "AdamW (torch)", "world_size": 1},
        "rows": rows,
    }
    return publish(result, format_table, json_path, _log)


def _log(message: str) -> None:
    print(f"[bench memory] {message}", flush=True)


def format_table(result: dict) -> str:
    settings = result["settings"]
    lines = [f"{settings['parameters'] / 1e9:.2f}B parameters ({settings['layers']} x Linear "
             f"{settings['width']}), batch {settings['batch_size']}, {result['machine']['device_name']}",
             f"{'strategy':<36} {'peak GiB':>9} {'bytes/param':>12} {'s/step':>8}"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['label']:<36} failed: {row['error']}")
        else:
            lines.append(f"{row['label']:<36} {row['peak_gib']:>9.2f} {row['bytes_per_param']:>12.2f} "
                         f"{row['step_s']:>8.3f}")
    return "\n".join(lines)


def _model(width: int, layers: int) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks)


def _measure(label, section, precision, width, layers) -> dict:
    try:
        return {"label": label, **_measure_in_process(section, precision, width, layers)}
    except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
        return {"label": label, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _measure_in_process(section, precision, width, layers) -> dict:
    with one_rank_process_group("cuda"):
        return _measure_step_memory(section, precision, width, layers)


def _measure_step_memory(section, precision, width, layers) -> dict:
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = _model(width, layers)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(BATCH, width, device=device)
    if section is None:
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from gentrain.validation import from_dict
        from gentrain.strategies import StepSettings, make_strategy
        from gentrain.optim import make_optimizer

        spec = from_dict({"job": {"type": "vae"}, "train": {"steps": STEPS, "batch_size": BATCH, "grad_clip": 1.0,
                                    "optimizer": {"name": "adamw", "lr": 1e-5},
                                    "schedule": {"name": "constant"}}})
        spec = dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, precision=precision,
                                                                      **section))
        strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), device)
        strategy.setup({"net": model}, {"net": make_optimizer(model.parameters(), spec.train.optimizer)})
        inputs = x.to(strategy.input_dtype)

        def step():
            with strategy.micro_step(is_last=True):
                with strategy.autocast():
                    loss = strategy.module("net")(inputs).float().pow(2).mean()
                strategy.backward(loss, "net")
                strategy.step("net")

    times = []
    for _ in range(STEPS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_gib": peak / 2**30, "bytes_per_param": peak / params,
            "step_s": sum(times[1:]) / len(times[1:])}
