"""Batches for one rank, read from packed WebDataset shards.

    gentrain run vae/debug     # every training worker reads through train_batches

    >>> from gentrain.data import load_index, resolve_builtin, train_batches
    >>> index = load_index(resolve_builtin("builtin:digits"))
    >>> next(train_batches(index, "train", 32, rank=0, world_size=1, seed=0))["image"].shape
    torch.Size([32, 1, 8, 8])

Shards are the unit of distribution: each epoch the split's shards are shuffled
with a seed shared by all ranks and dealt out round-robin, rank r taking shards
r, r + world_size, ...; inside a rank, DataLoader workers split them again
(`wds.split_by_worker`). Samples are shuffled in a buffer, decoded and batched
inside the pipeline, so the DataLoader only moves finished batches.

Every rank yields the same number of batches per epoch (`batches_per_epoch`),
whatever its shards hold, so collective ops in DDP never wait on a rank that
ran out of data.
"""

from __future__ import annotations

import functools
import io
import itertools
import random
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from gentrain.data.index import DatasetIndex


class DataConfigError(ValueError):
    """Batch size, world size or worker counts that this data set cannot serve."""


def decode_image(png: bytes, shape) -> torch.Tensor:
    """PNG bytes -> float32 [C, H, W] in [0, 1]; `shape` is the index's [C, H, W]."""
    channels, height, width = shape
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.array(image.convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(pixels)
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)
    if tuple(tensor.shape) != (channels, height, width):
        raise ValueError(
            f"decoded image has shape {list(tensor.shape)} but the index says {[channels, height, width]}: "
            "the shards and index.json disagree; repack with `gentrain data pack`"
        )
    return tensor.to(torch.float32).div_(255.0)


def batches_per_epoch(index: DatasetIndex, split: str, batch_size: int, world_size: int) -> int:
    """Full batches each rank yields per epoch: total samples // (world_size * batch_size)."""
    return index.total(split) // (world_size * batch_size)


def train_batches(
    index: DatasetIndex,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    loader_workers: int = 0,
    shuffle_buffer: int = 1000,
    start_epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[dict]:
    """An endless iterator of {"image": float32 [B, C, H, W] in [0, 1], "label": int64 [B]}.

    Epoch policy: every rank yields exactly `batches_per_epoch(...)` full batches
    per epoch, then starts the next epoch with a new shard deal and shuffle
    (seeded by `seed` and the epoch number, so a run is reproducible). Within an
    epoch each sample is read by at most one rank; a rank whose shards run out
    first (uneven shards, or partial batches dropped per loader worker) wraps
    around its own shards in a reshuffled order, and a rank with more data than
    it needs stops early. `start_batch` skips that many batches (it may span
    epochs) so that a resumed run continues where it stopped; skipped batches
    are still read.

    Raises DataConfigError at once (not on the first `next`) when the split
    cannot give every rank a full batch or every reader its own shard.
    """
    _check_ranks(rank, world_size, batch_size)
    if loader_workers < 0 or shuffle_buffer < 0 or start_epoch < 0 or start_batch < 0:
        raise DataConfigError(
            f"loader_workers ({loader_workers}), shuffle_buffer ({shuffle_buffer}), start_epoch ({start_epoch}) "
            f"and start_batch ({start_batch}) must all be >= 0"
        )
    per_epoch = batches_per_epoch(index, split, batch_size, world_size)
    if per_epoch == 0:
        raise DataConfigError(
            f"split {split!r} of {index.location} has {index.total(split)} samples, fewer than "
            f"batch_size {batch_size} x world_size {world_size} = {batch_size * world_size}, so no rank gets a "
            "full batch: lower train.batch_size or use fewer workers (scaling.num_workers)"
        )
    shard_count = len(index.split(split).shards)
    readers = world_size * max(1, loader_workers)
    if shard_count < readers:
        raise DataConfigError(
            f"split {split!r} of {index.location} has {shard_count} shards, but world_size {world_size} x "
            f"loader_workers {loader_workers} = {readers} readers need at least one shard each: repack with "
            "more shards (`gentrain data pack SOURCE --out DIR --per-shard N` with a smaller N) or use fewer "
            "workers (data.loader_workers, scaling.num_workers)"
        )
    first_epoch = start_epoch + start_batch // per_epoch
    epochs = _epochs(index, split, batch_size, rank, world_size, seed, loader_workers, shuffle_buffer, first_epoch)
    return itertools.islice(epochs, start_batch % per_epoch, None)


def eval_batches(index: DatasetIndex, split: str, batch_size: int, rank: int, world_size: int) -> Iterator[dict]:
    """One deterministic pass over this rank's shards (rank r reads shards r, r + world_size, ...).

    Batches are {"image", "label", "key"} ("key" lists the samples' `__key__`s);
    the last batch may be short and ranks may get different numbers of batches,
    so reduce metrics once after the pass rather than per batch.
    """
    _check_ranks(rank, world_size, batch_size)
    urls = index.shard_urls(split)[rank::world_size]
    if not urls:
        return iter(())
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        .map(_SampleDecoder(index.shape))
        .batched(batch_size, collation_fn=functools.partial(_collate, with_keys=True), partial=True)
    )
    return iter(dataset)


def _epochs(index, split, batch_size, rank, world_size, seed, loader_workers, shuffle_buffer, first_epoch):
    per_epoch = batches_per_epoch(index, split, batch_size, world_size)
    urls = index.shard_urls(split)
    for epoch in itertools.count(first_epoch):
        dataset = (
            wds.WebDataset(
                urls,
                shardshuffle=False,  # shard order is decided (per epoch, per rank) by _RankShards
                nodesplitter=_RankShards(rank, world_size, seed, epoch),
                workersplitter=wds.split_by_worker,
            )
            .compose(_WorkerShuffle(shuffle_buffer, seed, epoch, rank))
            .map(_SampleDecoder(index.shape))
            .batched(batch_size, collation_fn=_collate, partial=False)
        )
        # Its own generator: creating the loader must not draw from torch's global RNG,
        # or a resumed run's noise would differ from an uninterrupted one.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
        loader = DataLoader(dataset, batch_size=None, num_workers=loader_workers, generator=generator)
        batches = iter(loader)
        try:
            for _ in range(per_epoch):
                yield next(batches)
        finally:
            # Dropping the iterator shuts its workers down before the next epoch starts its own.
            del batches


class _RankShards:
    """Node splitter: this rank's shards for one epoch, repeated endlessly in fresh orders.

    The stream never ends so that the epoch length is set by the batch count
    alone; `split_by_worker` then deals this stream out to loader workers.
    """

    def __init__(self, rank: int, world_size: int, seed: int, epoch: int):
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch

    def __call__(self, source):
        urls = [item["url"] for item in source]
        # Same seed on every rank, so every rank sees the same deal and shares stay disjoint.
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(urls)
        mine = urls[self.rank :: self.world_size]
        for repeat in itertools.count():
            order = list(mine)
            random.Random(f"rank:{self.seed}:{self.epoch}:{self.rank}:{repeat}").shuffle(order)
            for url in order:
                yield {"url": url}


class _WorkerShuffle:
    """Buffer shuffle seeded by (seed, epoch, rank, loader worker): reproducible, and
    different in every worker so workers never mirror each other's order."""

    def __init__(self, buffer_size: int, seed: int, epoch: int, rank: int):
        self.buffer_size, self.seed, self.epoch, self.rank = buffer_size, seed, epoch, rank

    def __call__(self, samples):
        if self.buffer_size < 2:
            return samples
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream_seed = f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker}"
        initial = min(self.buffer_size, 100)
        return wds.filters.shuffle(self.buffer_size, initial=initial, seed=stream_seed)(samples)


class _SampleDecoder:
    """A shard sample {__key__, png, cls} -> (image tensor, label, key)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __call__(self, sample: dict):
        return decode_image(sample["png"], self.shape), int(sample["cls"]), sample["__key__"]


def _collate(samples, with_keys: bool = False) -> dict:
    images, labels, keys = zip(*samples)
    batch = {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.int64)}
    if with_keys:
        batch["key"] = list(keys)
    return batch


def _check_ranks(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataConfigError(f"rank {rank} is not in [0, world_size {world_size})")
    if batch_size < 1:
        raise DataConfigError(f"batch_size must be at least 1, got {batch_size}")
