"""Rank functions for tests/gpu: a conv VAE trained under every strategy and precision on CUDA.

Module level (spawned ranks import them by name). Every function returns plain numbers,
so the test process never touches CUDA itself.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os

import torch

from gentrain.optim import make_optimizer
from gentrain.spec import JobSpec
from gentrain.strategies import StepSettings, make_strategy
from gentrain.validation import from_dict
from gentrain_jobs.vae.model import ConvVAE
from gentrain_jobs.vae.objective import elbo_terms

SHAPE = (3, 32, 32)
BATCH = 64
LATENT = 32
CHANNELS = [32, 64, 128]
STEPS = 40

# (label, strategy section, precision)
CASES = [("ddp", {"name": "ddp"}), ("accelerate", {"name": "accelerate"})] + [
    (f"zero{stage}", {"name": "deepspeed", "zero_stage": stage}) for stage in (0, 1, 2, 3)
] + [
    ("zero2-offload", {"name": "deepspeed", "zero_stage": 2, "offload_optimizer": True}),
    ("zero3-offload", {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                       "offload_param": True}),
]
PRECISIONS = ("fp32", "bf16", "fp16")


def make_spec(section: dict, precision: str, **train) -> JobSpec:
    spec = from_dict({"job": {"type": "vae"}, "train": {"steps": STEPS, "batch_size": BATCH, "grad_clip": 1.0,
                                "optimizer": {"name": "adamw", "lr": 2e-3},
                                "schedule": {"name": "constant"}, **train}})
    # Set after validation: fp16 needs GPU workers in `scaling`, which these ranks are not.
    strategy = dataclasses.replace(spec.strategy, precision=precision, **section)
    return dataclasses.replace(spec, strategy=strategy)


def data(step: int) -> torch.Tensor:
    """Fixed binary images: a few smooth blobs per image, the same on every run."""
    generator = torch.Generator().manual_seed(step % 8)
    low = torch.rand(BATCH, SHAPE[0], 4, 4, generator=generator)
    return (torch.nn.functional.interpolate(low, size=SHAPE[1:], mode="bilinear") > 0.5).float()


def build(spec: JobSpec):
    torch.manual_seed(0)
    model = ConvVAE(SHAPE, LATENT, CHANNELS, "bernoulli")
    device = torch.device("cuda", torch.cuda.current_device())
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), device)
    strategy.setup({"vae": model}, {"vae": make_optimizer(model.parameters(), spec.train.optimizer)})
    return strategy, device


def train(strategy, device, first: int, last: int, poison_step: int | None = None) -> list[float]:
    losses = []
    dtype = strategy.input_dtype
    for step in range(first, last):
        x = data(step).to(device)
        noise = torch.randn(BATCH, LATENT, generator=torch.Generator().manual_seed(step)).to(device)
        with strategy.micro_step(is_last=True):
            with strategy.autocast():
                loss = elbo_terms(strategy.module("vae"), x.to(dtype), "bernoulli",
                                  noise=noise.to(dtype))["loss"].float().mean()
            handle = None
            if step == poison_step:  # an overflow: fp16 loss scaling must skip this update
                param = next(strategy.module("vae").parameters())
                handle = param.register_hook(lambda grad: grad * float("inf"))
            strategy.backward(loss, "vae")
            strategy.step("vae")
            if handle is not None:
                handle.remove()
        losses.append(float(loss.detach()))
    return losses


def flat(strategy) -> torch.Tensor:
    state = strategy.export_state_dicts()["vae"]
    return torch.cat([value.detach().flatten().float().cpu() for _, value in sorted(state.items())])


def where_params_live(strategy) -> str:
    module = strategy.unwrap("vae")
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    return ",".join(sorted({t.device.type for t in tensors}))


def where_optimizer_state_lives(strategy) -> str:
    """Devices of Adam's moments (and DeepSpeed's fp32 master partitions)."""
    engine = strategy.module("vae")
    optimizer = getattr(engine, "basic_optimizer", None) or strategy._optimizers["vae"]
    tensors = [t for state in optimizer.state.values() for k, t in state.items()
               if torch.is_tensor(t) and k != "step"]
    tensors += [p for group in optimizer.param_groups for p in group["params"]]
    return ",".join(sorted({t.device.type for t in tensors}))


def matrix(rank: int, world: int, cases: list[str], precisions: list[str]) -> dict:
    """Loss curves, parameter placement and peak memory of each (case, precision)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    results = {}
    for label, section in CASES:
        if label not in cases:
            continue
        for precision in precisions:
            torch.cuda.reset_peak_memory_stats()
            try:
                strategy, device = build(make_spec(section, precision))
                losses = train(strategy, device, 0, STEPS)
                results[(label, precision)] = {
                    "losses": losses, "params_on": where_params_live(strategy),
                    "optimizer_state_on": where_optimizer_state_lives(strategy),
                    "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                    "finite": bool(torch.isfinite(flat(strategy)).all()),
                }
            except Exception as exc:  # noqa: BLE001 - reported per case, the test decides
                results[(label, precision)] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            finally:
                strategy = None
                gc.collect()
                torch.cuda.empty_cache()
    return results


def overflow(rank: int, world: int, cases: list[str]) -> dict:
    """fp16: an inf gradient at step 3 leaves the weights untouched, later steps train on."""
    results = {}
    for label, section in CASES:
        if label not in cases:
            continue
        # A schedule that moves every step: a skipped update must not advance it.
        strategy, device = build(make_spec(section, "fp16", schedule={"name": "cosine"}))
        train(strategy, device, 0, 3)
        before, lr_before = flat(strategy), strategy.lr("vae")
        train(strategy, device, 3, 4, poison_step=3)
        after_poison, lr_after_poison = flat(strategy), strategy.lr("vae")
        later = train(strategy, device, 4, 10)
        results[label] = {
            "changed_by_overflow": float((after_poison - before).abs().max()),
            "lr": (lr_before, lr_after_poison, strategy.lr("vae")),
            "finite_after": bool(torch.isfinite(flat(strategy)).all()) and all(map(math.isfinite, later)),
            "moved_after": float((flat(strategy) - after_poison).abs().max()),
        }
        strategy = None
        gc.collect()
    return results


def resume(rank: int, world: int, directory: str, cases: list[str], precision: str) -> dict:
    """N steps, save, fresh strategy, load, N more == 2N straight (GPU, mixed precision)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    results = {}
    half = 10
    for label, section in CASES:
        if label not in cases:
            continue
        spec = make_spec(section, precision)
        straight, device = build(spec)
        train(straight, device, 0, 2 * half)
        expected = flat(straight)
        straight = None
        gc.collect()
        first, device = build(spec)
        train(first, device, 0, half)
        folder = os.path.join(directory, f"{label}-{precision}")
        os.makedirs(folder, exist_ok=True)
        first.write_checkpoint(folder, rank)
        first.barrier()
        first = None
        gc.collect()
        resumed, device = build(spec)
        resumed.load(folder)
        train(resumed, device, half, 2 * half)
        results[label] = float((flat(resumed) - expected).abs().max())
        resumed = None
        gc.collect()
    return results


# -- periodic sample metrics (eval.metrics) on a device ------------------------------------
def periodic_metrics(rank: int, world: int, device_type: str, data_dir: str, weights: str, cache: str,
                     samples: int = 300) -> dict:
    """FID/KID/IS of a freshly built VAE's samples against digits, as Worker.evaluate computes them:
    sampling, Inception (random weights with the standard keys) and the float64 all-reduces on
    `device_type` (nccl for cuda, gloo for cpu). TF32 is off so both devices do fp32 arithmetic."""
    from gentrain.data.index import load_index
    from gentrain.evaluation.periodic import PeriodicSampleMetrics
    from gentrain.registry import DataInfo, get_job_type
    from gentrain.registry import job_config

    os.environ["GENTRAIN_CACHE"] = cache  # a cache per device: each computes its reference
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    spec = from_dict({"job": {"type": "vae"}, "data": {"source": data_dir},
                      "eval": {"metrics": ["fid", "kid", "is"], "fid_samples": samples, "sample_batch_size": 100,
                               "extractor": "inception", "inception_weights": weights}})
    index = load_index(data_dir)
    job = get_job_type("vae")
    torch.manual_seed(0)
    modules = {name: module.to(device).eval()
               for name, module in job.build(job_config(spec), DataInfo(tuple(index.shape), index.num_classes)).items()}

    def all_reduce(tensor, op="mean"):
        reduced = tensor.to(device, copy=True)
        torch.distributed.all_reduce(reduced)
        return (reduced / world if op == "mean" else reduced).to(tensor.device)

    metrics = PeriodicSampleMetrics(spec, index, rank, world, device, all_reduce)
    first = metrics(job, modules)
    second = metrics(job, modules)  # the reference now comes from the cache
    return {"first": first, "second": second}
