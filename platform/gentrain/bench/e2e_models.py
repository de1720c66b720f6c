"""The models `gentrain bench e2e --model NAME` runs, and what each side is given.

    gentrain bench e2e                        # debug-vae (the default)
    gentrain bench e2e --model cifar10-vae    # the CIFAR-10 VAE of vae/cifar10.yaml, on CPU

- debug-vae: `gentrain run vae/debug` as shipped (digits, batch 32, 300 steps) against the
  plain script on the digits in memory. The spec kind runs the debug spec's own periodic
  evaluation (every 150 steps) and checkpoints (every 100).
- cifar10-vae: the network of vae/cifar10.yaml (four stride-2 convs 128-256-512-1024, latent
  128, discretized-logistic likelihood: 19.1M parameters) at the spec's batch, 50 per worker,
  on CPU: a real size, about a second a step on one core of the 2-core development machine.
  No CIFAR-10 ships on this machine, so the bench writes a fixed synthetic set
  (`synthetic_images`: smooth seeded 32x32 RGB images, SYNTHETIC_TRAIN + SYNTHETIC_TEST) as
  an .npz with x_train/x_test and packs it with gentrain's own packing (pack_source, as
  `gentrain data pack` does) before any timed run. The plain script holds the .npz's
  x_train in memory, scaled to [0, 1] as gentrain's pipeline scales the packed pixels.

What the cifar10-vae's gentrain side overrides in the shipped spec, on both gentrain kinds
(CPU_OVERRIDES), and why:

- strategy.precision=fp32, scaling.use_gpu=false: the spec is for a GPU in bf16; the plain
  script runs fp32 on CPU;
- eval.metrics=[]: FID/KID/IS need the Inception weights, which are not on this machine;
- job.config.free_bits=0 and kl_anneal.schedule=none: the plain ELBO, the loss the plain
  script writes (the same mathematics on both sides; free bits and the KL warm-up cost
  nothing measurable, but they would make the two losses differ);
- job.config.iwae_samples=8, iwae_chunk=8: the evaluation's IWAE bound with the spec's
  1000 importance samples decodes 1000 x 100 images per rank, minutes on a CPU; 8 is the
  debug spec's seconds-cheap bound;
- data.augment.flip=false: the plain script does not flip, so both do the same work;
- train.schedule.warmup_steps=0: the spec's 1000 warm-up steps must be fewer than train.steps.

Its spec kind scales the spec's periodic work to the run, in the debug spec's proportions:
a checkpoint every third of the run (3 per run: 19.1M parameters plus AdamW's two moments,
about 230 MB each) and an evaluation at its middle (eval.every = steps / 2: held-out ELBO,
IWAE-8 and active units over the 200 test images, 100 per rank, a 64-sample grid, the reconstructions,
traversals and interpolations), besides the evaluations at the start and the end that
every gentrain run makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SYNTHETIC_TRAIN = 2000
SYNTHETIC_TEST = 200
SYNTHETIC_SEED = 0
SYNTHETIC_NAME = "cifar10-synthetic"
# Two test shards, so each of the 2 ranks evaluates its own 100 images (evaluation reads
# whole shards per rank: one shard would leave all of it to rank 0); a real CIFAR-10 pack's
# 10,000 test images at 512 a shard are 20 shards.
SYNTHETIC_PER_SHARD = 100
# The coarse colour field each synthetic image is smoothed up from (side, in pixels).
_COARSE_SIDE = 4

CPU_OVERRIDES = (
    "strategy.precision=fp32", "scaling.use_gpu=false", "eval.metrics=[]",
    "job.config.free_bits=0", "job.config.kl_anneal.schedule=none",
    "job.config.iwae_samples=8", "job.config.iwae_chunk=8",
    "data.augment.flip=false", "train.schedule.warmup_steps=0",
)


@dataclass(frozen=True)
class Prepared:
    """A model's data, ready before any timed run: what each side is told about it."""

    train_samples: int
    gentrain_overrides: tuple[str, ...]  # spec overrides for both gentrain kinds
    baseline_args: tuple[str, ...]  # arguments of baseline_ray_train.py


@dataclass(frozen=True)
class E2EModel:
    name: str
    spec: str  # what `gentrain run` runs
    spec_label: str  # the table's name for the spec kind's periodic evaluation and checkpoints
    steps: int  # default train.steps
    batch_size: int  # default per worker
    log_every: int  # train.log_every on both sides (the progress marks the rates are read from)
    lr: float  # AdamW's learning rate on both sides (the spec's)
    prepare: Callable[[Path], Prepared]
    # The spec kind's overrides for a run of `steps` (empty: the spec's own eval/ckpt).
    periodic: Callable[[int], tuple[str, ...]]


def _prepare_digits(folder: Path) -> Prepared:
    from gentrain.data.index import default_cache_dir, load_index, resolve_builtin

    # Pack the digits once, before any timed run (a first `gentrain run` would do it).
    samples = load_index(resolve_builtin("builtin:digits", default_cache_dir())).total("train")
    return Prepared(samples, (), ("--samples", str(samples)))


def synthetic_images(count: int, seed: int) -> np.ndarray:
    """`count` smooth RGB images, uint8 [count, 32, 32, 3], the same for the same seed.

    Each is a random coarse 4x4 colour field, bilinearly smoothed up to 32x32, plus a
    little pixel noise: structure for the convolutions to learn, no two images alike.
    """
    import torch

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 255.0, (count, 3, _COARSE_SIDE, _COARSE_SIDE)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(32, 32), mode="bilinear",
                                             align_corners=False).numpy()
    noisy = smooth + rng.normal(0.0, 4.0, smooth.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def write_synthetic(folder: Path, train: int = SYNTHETIC_TRAIN, test: int = SYNTHETIC_TEST,
                    seed: int = SYNTHETIC_SEED) -> tuple[Path, Path]:
    """The synthetic set as `folder`/cifar10-synthetic.npz (x_train/y_train/x_test/y_test, labels
    all 0), packed by gentrain into `folder`/cifar10-synthetic/; returns (npz, packed folder)."""
    from gentrain.data.pack import pack_source

    npz = folder / f"{SYNTHETIC_NAME}.npz"
    if not npz.exists():  # a kept folder's (--keep): rewriting it would repack it
        images = synthetic_images(train + test, seed)
        np.savez(npz, x_train=images[:train], y_train=np.zeros(train, dtype=np.int64),
                 x_test=images[train:], y_test=np.zeros(test, dtype=np.int64))
    packed = folder / SYNTHETIC_NAME
    pack_source(str(npz), packed, per_shard=SYNTHETIC_PER_SHARD, progress=False)  # a finished pack is kept
    return npz, packed


def _prepare_cifar10(folder: Path) -> Prepared:
    npz, packed = write_synthetic(folder)
    return Prepared(SYNTHETIC_TRAIN, (f"data.source={packed}", *CPU_OVERRIDES), ("--data", str(npz)))


def _scaled_periodic(steps: int) -> tuple[str, ...]:
    return (f"checkpoint.every={max(1, steps // 3)}", f"eval.every={max(1, steps // 2)}")


MODELS = {
    "debug-vae": E2EModel("debug-vae", "vae/debug", "debug spec", steps=300, batch_size=32, log_every=25,
                          lr=2e-3, prepare=_prepare_digits, periodic=lambda steps: ()),
    "cifar10-vae": E2EModel("cifar10-vae", "vae/cifar10", "scaled cifar10 spec", steps=60,
                            batch_size=50, log_every=5, lr=1e-3, prepare=_prepare_cifar10,
                            periodic=_scaled_periodic),
}
