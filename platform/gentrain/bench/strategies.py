"""Training throughput of each strategy and precision against a plain PyTorch loop.

    gentrain bench strategies                      # on a GPU if there is one, else the CPU
    gentrain bench strategies --device cpu --steps 10 --json bench-strategies.json

The same convolutional VAE (the VAE job type's network and loss) is trained on the same
synthetic batches by

- the baseline: a plain PyTorch loop in this process (AdamW, `torch.autocast` for bf16,
  autocast + `GradScaler` for fp16, gradient clipping), no process group, no wrapper;
- every strategy gentrain offers: ddp, accelerate, deepspeed ZeRO 0-3, through the
  strategy interface the training loop uses (micro_step, autocast, backward, step),
  on a process group of one rank (nccl on a GPU, gloo on the CPU).

So the ratio is the cost of the strategy layer and of each engine on one device, not
scaling across devices. Each row times `steps` optimizer steps after `warmup` steps, three
times, and reports the median samples/s; the GPU is synchronised before every clock read.
Rows alternate strategy and baseline per precision, so a change in load hits both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gentrain.bench.common import one_rank_process_group, publish, timestamp
from gentrain.registry import DataInfo, get_job_type
from gentrain.spec import JobSpec
from gentrain.optim import make_optimizer
from gentrain.strategies import StepSettings, make_strategy
from gentrain.strategies.base import LOW_PRECISION_DTYPES
from gentrain.validation import from_dict

REPEATS = 3
STRATEGIES = {
    "ddp": {"name": "ddp"},
    "accelerate": {"name": "accelerate"},
    **{f"deepspeed-zero{stage}": {"name": "deepspeed", "zero_stage": stage} for stage in range(4)},
}
SIZES = {  # image shape, latent, channels, batch
    "gpu": ((3, 64, 64), 128, [64, 128, 256, 512], 128),
    "cpu": ((3, 32, 32), 32, [16, 32, 64], 32),
}


def run_strategy_bench(device: str | None = None, steps: int | None = None, warmup: int = 5,
                       precisions: tuple[str, ...] | None = None,
                       json_path: str | None = "bench-strategies.json") -> dict:
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench strategies: --device cuda but torch sees no CUDA device")
    steps = steps or (50 if device_type == "cuda" else 10)
    precisions = precisions or (("fp32", "bf16", "fp16") if device_type == "cuda" else ("fp32", "bf16"))
    shape, latent, channels, batch = SIZES["gpu" if device_type == "cuda" else "cpu"]
    settings = {"device": device_type, "steps": steps, "warmup": warmup, "repeats": REPEATS,
                "statistic": "median samples/s", "image_shape": list(shape), "latent": latent,
                "channels": channels, "batch_size": batch, "world_size": 1}
    rows = []
    with one_rank_process_group(device_type):
        dev = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" \
            else torch.device("cpu")
        model_args = (shape, latent, channels)
        for precision in precisions:
            baseline = _median(lambda: _plain(model_args, batch, precision, dev, steps, warmup))
            _log(f"{'plain pytorch':<18} {precision:<5} {baseline:10.1f} samples/s")
            rows.append({"strategy": "plain pytorch", "precision": precision,
                         "samples_per_s": baseline, "ratio": 1.0})
            for name, section in STRATEGIES.items():
                try:
                    rate = _median(lambda: _gentrain(model_args, batch, precision, section, dev, steps, warmup))
                    row = {"samples_per_s": rate, "ratio": rate / baseline}
                except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
                    row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append({"strategy": name, "precision": precision, **row})
                outcome = row.get("error") or f"{row['samples_per_s']:10.1f} samples/s"
                _log(f"{name:<18} {precision:<5} {outcome}")
    result = {
        "benchmark": "strategies",
        "command": f"gentrain bench strategies --device {device_type} --steps {steps}",
        "timestamp": timestamp(),
        "machine": _machine(device_type),
        "settings": settings,
        "rows": rows,
    }
    return publish(result, format_table, json_path, _log)


def format_table(result: dict) -> str:
    lines = [f"{'strategy':<18} {'precision':<9} {'samples/s':>11} {'vs plain':>9}"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['strategy']:<18} {row['precision']:<9} {'failed':>11}  {row['error']}")
        else:
            lines.append(f"{row['strategy']:<18} {row['precision']:<9} {row['samples_per_s']:>11.1f} "
                         f"{row['ratio']:>8.2f}x")
    machine = result["machine"]
    lines.append(f"device: {machine['device_name']}; torch {machine['torch']}; "
                 f"{result['settings']['steps']} timed steps of batch {result['settings']['batch_size']}, "
                 f"median of {REPEATS}")
    return "\n".join(lines)


# -- the two loops ---------------------------------------------------------------------------
def _model(model_args):
    """The VAE job type's network, found through the registry (the core never imports a family)."""
    shape, latent, channels = model_args
    job = get_job_type("vae")
    config = job.parse_config({"latent_dim": latent, "channels": channels, "likelihood": "bernoulli"}, [])
    torch.manual_seed(0)
    return job.build(config, DataInfo(tuple(shape)))["vae"]


def _loss(model, x, noise):
    """The negative Bernoulli ELBO of the VAE's reparameterised pass with fixed noise."""
    decoded, mean, log_var, _ = model(x, noise=noise)
    reconstruction = F.binary_cross_entropy_with_logits(decoded.float(), x.float(), reduction="none")
    kl = 0.5 * (mean.float().pow(2) + log_var.float().exp() - 1 - log_var.float())
    return (reconstruction.flatten(1).sum(1) + kl.sum(1)).mean()


def _batches(model_args, batch, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    shape, latent = model_args[0], model_args[1]
    data = [((torch.rand(batch, *shape, generator=generator) > 0.5).to(device, dtype),
             torch.randn(batch, latent, generator=generator).to(device, dtype)) for _ in range(4)]
    return lambda step: data[step % len(data)]


def _plain(model_args, batch, precision, device, steps, warmup) -> float:
    model = _model(model_args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = LOW_PRECISION_DTYPES.get(precision)
    data = _batches(model_args, batch, device)

    def step(i):
        x, noise = data(i)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = _loss(model, x, noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return _time(step, steps, warmup, batch, device)


def _gentrain(model_args, batch, precision, section, device, steps, warmup) -> float:
    spec = _spec(precision, section, steps + warmup, batch)
    model = _model(model_args)
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), device)
    strategy.setup({"vae": model}, {"vae": make_optimizer(model.parameters(), spec.train.optimizer)})
    data = _batches(model_args, batch, device, strategy.input_dtype)

    def step(i):
        x, noise = data(i)
        with strategy.micro_step(is_last=True):
            with strategy.autocast():
                loss = _loss(strategy.module("vae"), x, noise)
            strategy.backward(loss, "vae")
            strategy.step("vae")

    try:
        return _time(step, steps, warmup, batch, device)
    finally:
        strategy = model = None  # frees the engines before emptying the cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _spec(precision: str, section: dict, total_steps: int, batch: int) -> JobSpec:
    spec = from_dict({"job": {"type": "vae"}, "train": {"steps": total_steps, "batch_size": batch, "grad_clip": 1.0,
                                "optimizer": {"name": "adamw", "lr": 1e-4},
                                "schedule": {"name": "constant"}}})
    # Set after validation: fp16 is refused for CPU-only scaling sections, and this bench
    # runs in-process rather than on Ray workers.
    return dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, precision=precision,
                                                                  **section))


def _time(step, steps: int, warmup: int, batch: int, device: torch.device) -> float:
    for i in range(warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _median(measure) -> float:
    return statistics.median(measure() for _ in range(REPEATS))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device_type: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": device_type,
            "device_name": torch.cuda.get_device_name() if device_type == "cuda" else platform.processor() or "cpu"}
    for package in ("deepspeed", "accelerate"):
        with contextlib.suppress(Exception):
            import importlib.metadata

            info[package] = importlib.metadata.version(package)
    return info


def _log(message: str) -> None:
    print(f"[bench strategies] {message}", flush=True)
