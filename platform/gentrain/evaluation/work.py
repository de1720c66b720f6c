"""Evaluation work cut into units that any worker can do in any order, with the same result.

    units = generated_units(50_000, chunk=250)       # (unit, first row, rows): rows of the sample stream
    summary = summarize_generated(trained.draw, extractor, units[rank::world], total=50_000, seed=0)
    units = data_units(index, "train", 50_000)       # (shard, first row, rows): the first N samples in shard order

A generated unit's samples come from its own generator, seeded by (seed, unit), so unit
7 gives the same images on whichever worker draws it; a data unit is one shard, whose
rows sit at a fixed place in the split's order. Every row has a global index, so the
merged FeatureSummary (metrics/summary.py) does not depend on the number of workers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from gentrain.metrics.features import features_and_logits
from gentrain.metrics.settings import MAX_KEPT_FEATURES
from gentrain.metrics.summary import FeatureSummary


class Unit(NamedTuple):
    number: int  # the chunk number (generated) or the shard number (data)
    start: int  # global index of its first row
    rows: int


def generated_units(total: int, chunk: int) -> list[Unit]:
    if total < 2 or chunk < 1:
        raise ValueError(f"number of samples ({total}) must be >= 2 and the batch size ({chunk}) >= 1")
    return [Unit(number, start, min(chunk, total - start)) for number, start in enumerate(range(0, total, chunk))]


def data_units(index, split: str, num_samples: int) -> list[Unit]:
    """The first num_samples of the split, shard by shard in index order."""
    units, start = [], 0
    for shard, count in enumerate(index.split(split).counts):
        rows = min(count, num_samples - start)
        if rows <= 0:
            break
        units.append(Unit(shard, start, rows))
        start += rows
    return units


def kept_rows(total: int, shuffled: bool, seed: int = 0) -> np.ndarray:
    """Which rows KID/PR keep: the first ones of i.i.d. samples; a seeded uniform subset of data rows
    (a split may be ordered by class)."""
    count = min(total, MAX_KEPT_FEATURES)
    if not shuffled or count == total:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def unit_generator(seed: int, unit: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + unit)


def batch_generator(seed: int, batch_number: int) -> torch.Generator:
    """The generator `evaluate` gets for held-out batch `batch_number`: the same weights and
    batch give the same metrics at every evaluation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7_919 + batch_number)


Draw = Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> n samples: the job type's sample


@torch.no_grad()
def summarize_generated(draw: Draw, extractor, units: list[Unit], total: int, seed: int,
                        keep: np.ndarray | None = None, is_splits: int = 10,
                        what: str = "sample()") -> FeatureSummary:
    summary = FeatureSummary(total, kept_rows(total, False) if keep is None else keep,
                             getattr(extractor, "logits_dim", None), is_splits)
    for unit in units:
        images = draw(unit.rows, unit_generator(seed, unit.number))
        _check_images(images, what)
        features, logits = features_and_logits(extractor, images.float().cpu())
        summary.add(features.numpy(), None if logits is None else logits.numpy(), unit.start)
    return summary


def summarize_data(index, split: str, extractor, units: list[Unit], total: int, batch_size: int = 250,
                   keep: np.ndarray | None = None, on_error: str = "fail") -> FeatureSummary:
    from gentrain.data.pipeline import eval_batches

    shards = len(index.split(split).shards)
    summary = FeatureSummary(total, kept_rows(total, True) if keep is None else keep)
    for unit in units:
        # rank = shard, world = shard count: exactly this one shard, in its stored order
        done = 0
        for batch in eval_batches(index, split, batch_size, unit.number, shards, on_error=on_error,
                                  allow_pipe=index.trusted):
            images = batch["image"][:unit.rows - done]
            features, _ = features_and_logits(extractor, images)
            summary.add(features.numpy(), None, unit.start + done)
            done += images.shape[0]
            if done >= unit.rows:
                break
    return summary


def _check_images(images, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"{what} returned {type(images).__name__} {tuple(getattr(images, 'shape', ()))}: "
                         "sample metrics (fid, kid, is, pr) need float images [N, C, H, W] in [0, 1]")
