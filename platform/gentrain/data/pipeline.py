"""Batches for one rank, read from packed WebDataset shards.

    gentrain run vae/debug     # every training worker reads through train_batches

    >>> from gentrain.data import load_index, train_batches
    >>> index = load_index("builtin:digits")
    >>> next(train_batches(index, "train", 32, rank=0, world_size=1, seed=0))["image"].shape
    torch.Size([32, 1, 8, 8])

Shards are the unit of distribution: each epoch the split's shards are shuffled
with a seed shared by all ranks and dealt out round-robin, rank r taking shards
r, r + world_size, ...; a rank's DataLoader workers split its share the same
way (see `reader.ReaderShards`). Samples are shuffled in a buffer that empties
at the end of each pass over a reader's shards (so a reader never repeats a
sample before it has yielded all its others), then decoded, batched and
augmented inside the pipeline, so the DataLoader only moves finished batches.
Shards stream from local disk, http(s), s3 or gs (`remote`).

Exact epochs and the drop policy. With N samples in the split, every rank
yields exactly N // (world_size * batch_size) full batches per epoch, whatever
its shards hold, so collective ops in DDP never wait on a rank that ran out of
data. Within an epoch no sample is read by two ranks, since ranks hold disjoint
shards. What does not fit is settled per reader (a rank, or one of its loader
workers), never by borrowing from another rank:

- a reader holding more samples than its batches need stops early: the rest of
  its stream is dropped for this epoch (at least the N mod (world_size *
  batch_size) remainder is always dropped);
- a reader holding fewer wraps around its own shards in a fresh order, so some
  of its samples are seen twice in that epoch;
- partial batches are never yielded.

So a sample is seen exactly once per epoch when every reader's shards hold the
same number of samples and that is a multiple of the batch size; otherwise the
imbalance is dropped or repeated as above. The deal is reshuffled every epoch,
so no sample is dropped in every epoch.

Resampled mode (`resampled=True`) is for sets too large to go round: every
reader draws shards from the whole split with replacement, and an epoch is
`epoch_samples` (default: the split's size) // (world_size * batch_size) batches.

Resume: the stream is a pure function of (seed, epoch, rank, batches read), so
`start_epoch`/`start_batch` re-read and discard the batches a run consumed
before its checkpoint and continue with the next unseen ones.

Small sets are decoded once (`cache_bytes`, data.cache_mb): when a split's decoded
samples fit, each shard is read and decoded the first time the stream reaches it and
kept, as decoded samples, for the rest of the run. The stream is the same sample for
sample (the shuffle buffer's order does not depend on what it holds); only reading in
the training process (data.loader_workers: 0) and data.on_error: fail use it, where a
bad shard raises either way.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from gentrain.data.augment import Augmentation, AugmentBatches
from gentrain.data.errors import DataConfigError, ShardReadError  # noqa: F401 - re-exported
from gentrain.data.index import DatasetIndex
from gentrain.data.reader import ReaderShards, ReadLog, SampleDecoder, ShardSamples, check_on_error, worker_slot
from gentrain.data.reader import decode_image  # noqa: F401 - re-exported
from gentrain.data.remote import check_readable

# Each batch carries the samples its reader skipped since its previous batch
# under this key, from the loader worker to `Batches`, which removes it.
SKIPPED_KEY = "__skipped__"


def batches_per_epoch(index: DatasetIndex, split: str, batch_size: int, world_size: int,
                      epoch_samples: int | None = None) -> int:
    """Full batches each rank yields per epoch: (epoch_samples or the split's total) // (world_size * batch_size)."""
    samples = index.total(split) if epoch_samples is None else epoch_samples
    return samples // (world_size * batch_size)


class Batches:
    """An iterator of batch dicts that also counts what data.on_error: skip left out.

    `skipped_samples` is the number of samples this rank skipped (unreadable
    shards' unread samples plus undecodable samples) in the batches it has
    yielded so far; batches discarded to resume are not counted again.
    """

    def __init__(self, batches: Iterator[dict], discard: int = 0, tail_log: ReadLog | None = None):
        self._batches, self._discard, self._tail_log = batches, discard, tail_log
        self.skipped_samples = 0

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict:
        while self._discard:
            next(self._batches)
            self._discard -= 1
        try:
            batch = next(self._batches)
        except StopIteration:
            # Shards skipped after the last batch of a finite pass have no batch to ride on.
            if self._tail_log is not None:
                self.skipped_samples += self._tail_log.take()
            raise
        self.skipped_samples += batch.pop(SKIPPED_KEY, 0)
        return batch


@dataclass(frozen=True)
class _Reading:
    """Everything one rank's training stream depends on."""

    index: DatasetIndex
    split: str
    batch_size: int
    rank: int
    world_size: int
    seed: int
    loader_workers: int
    shuffle_buffer: int
    per_epoch: int
    augment: Augmentation | None
    resampled: bool
    on_error: str
    allow_pipe: bool
    with_keys: bool
    cache: dict | None  # shard URL -> its decoded samples, when the split is decoded once


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
    *,
    augment: Augmentation | None = None,
    resampled: bool = False,
    epoch_samples: int | None = None,
    on_error: str = "fail",
    allow_pipe: bool = False,
    with_keys: bool = False,
    cache_bytes: int = 0,
) -> Batches:
    """An endless iterator of {"image": float32 [B, C, H, W] in [0, 1], "label": int64 [B]}.

    Every rank yields exactly `batches_per_epoch(...)` full batches per epoch
    (see the module docstring for what is dropped or repeated), then starts the
    next epoch with a new deal and shuffle seeded by `seed` and the epoch.
    `start_batch` skips that many batches (it may span epochs) so that a resumed
    run continues where it stopped. `augment` applies to these batches only;
    `with_keys` adds "key", the samples' `__key__`s. `cache_bytes`: decode the split
    once and keep it when its decoded samples fit in that many bytes (0: never; see the
    module docstring). The data.* settings map to the keyword arguments of the same names
    (data.cache_mb to cache_bytes).

    Raises DataConfigError, UnsafeURLError or MissingExtraError at once (not on
    the first `next`) for settings or URLs this split cannot serve, and
    ShardReadError where a bad shard is read (unless on_error="skip").
    """
    _check_ranks(rank, world_size, batch_size)
    if loader_workers < 0 or shuffle_buffer < 0 or start_epoch < 0 or start_batch < 0:
        raise DataConfigError(
            f"loader_workers ({loader_workers}), shuffle_buffer ({shuffle_buffer}), start_epoch ({start_epoch}) "
            f"and start_batch ({start_batch}) must all be >= 0"
        )
    check_on_error(on_error)
    _check_epoch_samples(epoch_samples, resampled)
    check_readable(index.shard_urls(split), allow_pipe)
    per_epoch = batches_per_epoch(index, split, batch_size, world_size, epoch_samples if resampled else None)
    _check_enough_data(index, split, batch_size, world_size, loader_workers, per_epoch, resampled, epoch_samples)
    cache = {} if _cacheable(index, split, loader_workers, on_error, cache_bytes) else None
    reading = _Reading(index, split, batch_size, rank, world_size, seed, loader_workers, shuffle_buffer, per_epoch,
                       augment, resampled, on_error, allow_pipe, with_keys, cache)
    first_epoch = start_epoch + start_batch // per_epoch
    return Batches(_epochs(reading, first_epoch), discard=start_batch % per_epoch)


def decoded_bytes(index: DatasetIndex, split: str) -> int:
    """Bytes the split's samples hold decoded (uint8 images; int64 tokens), before batching."""
    per_sample = 1
    for side in index.shape:
        per_sample *= int(side)
    return index.total(split) * per_sample * (8 if index.kind == "text" else 1)


def _cacheable(index: DatasetIndex, split: str, loader_workers: int, on_error: str, cache_bytes: int) -> bool:
    # Loader workers are started again every epoch: a cache in them would not outlive it.
    return (cache_bytes > 0 and loader_workers == 0 and on_error == "fail"
            and decoded_bytes(index, split) <= cache_bytes)


def eval_batches(index: DatasetIndex, split: str, batch_size: int, rank: int, world_size: int, *,
                 on_error: str = "fail", allow_pipe: bool = False) -> Batches:
    """One deterministic pass over this rank's shards (rank r reads shards r, r + world_size, ...).

    Batches are {"image", "label", "key"} ({"tokens", "key"} for text, with "bytes" and "first_bytes"
    for BPE text; "key" lists the samples' `__key__`s),
    never augmented; the last batch may be short and ranks may get different
    numbers of batches, so reduce metrics once after the pass rather than per batch.
    """
    _check_ranks(rank, world_size, batch_size)
    check_on_error(on_error)
    urls = index.shard_urls(split)
    check_readable(urls, allow_pipe)
    log = ReadLog(on_error)
    pipeline = wds.DataPipeline(
        functools.partial(iter, urls[rank::world_size]),  # a bare list would be taken as a list of stages
        ShardSamples(dict(zip(urls, index.split(split).counts)), log, allow_pipe),
        SampleDecoder(index.shape, log, index.dtype),
        wds.filters.batched(batch_size, collation_fn=functools.partial(_collate, kind=index.kind, with_keys=True),
                            partial=True),
        _AttachSkipped(log),
    )
    return Batches(iter(pipeline), tail_log=log)


def _epochs(reading: _Reading, first_epoch: int) -> Iterator[dict]:
    for epoch in itertools.count(first_epoch):
        pipeline = _train_pipeline(reading, epoch)
        if reading.loader_workers == 0:
            # Read in this process: a DataLoader would only pass each finished batch through.
            batches = iter(pipeline)
        else:
            # Its own generator: creating the loader must not draw from torch's global RNG,
            # or a resumed run's noise would differ from an uninterrupted one.
            generator = torch.Generator().manual_seed(reading.seed * 1_000_003 + epoch * 1_009 + reading.rank)
            batches = iter(DataLoader(pipeline, batch_size=None, num_workers=reading.loader_workers,
                                      generator=generator))
        try:
            for _ in range(reading.per_epoch):
                yield next(batches)
        finally:
            # Dropping the iterator shuts its workers down before the next epoch starts its own.
            del batches


def _train_pipeline(reading: _Reading, epoch: int) -> wds.DataPipeline:
    """One epoch's stages; each loader worker runs its own copy (and its own ReadLog)."""
    index, seed, rank = reading.index, reading.seed, reading.rank
    log = ReadLog(reading.on_error)
    urls = index.shard_urls(reading.split)
    samples = ShardSamples(dict(zip(urls, index.split(reading.split).counts)), log, reading.allow_pipe)
    decoder = SampleDecoder(index.shape, log, index.dtype)
    if reading.cache is not None:  # decoded once: the shuffle buffer then moves decoded samples
        samples, decoder = _DecodedOnce(samples, decoder, reading.cache), None
    stages = [
        ReaderShards(urls, rank, reading.world_size, seed, epoch, log, resampled=reading.resampled),
        _ShuffledCycles(samples, reading.shuffle_buffer, seed, epoch, rank),
        *([decoder] if decoder is not None else []),
        wds.filters.batched(reading.batch_size, partial=False,
                            collation_fn=functools.partial(_collate, kind=index.kind, with_keys=reading.with_keys)),
    ]
    if reading.augment is not None and reading.augment.enabled:
        stages.append(AugmentBatches(reading.augment, seed, epoch, rank))
    stages.append(_AttachSkipped(log))
    return wds.DataPipeline(*stages)


class _ShuffledCycles:
    """Stage: cycles of shard URLs -> their samples, shuffled in a buffer that empties at the
    end of each cycle, seeded by (seed, epoch, rank, loader worker, cycle): reproducible,
    different in every worker, and never mixing a sample's second reading into its first round."""

    def __init__(self, shard_samples: ShardSamples, buffer_size: int, seed: int, epoch: int, rank: int):
        self.shard_samples, self.buffer_size = shard_samples, buffer_size
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, cycles):
        worker = worker_slot()[0]
        for number, urls in enumerate(cycles):
            samples = self.shard_samples(urls)
            if self.buffer_size >= 2:
                stream_seed = f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker}:{number}"
                shuffle = wds.filters.shuffle(self.buffer_size, initial=min(self.buffer_size, 100), seed=stream_seed)
                samples = shuffle(samples)
            yield from samples


class _DecodedOnce:
    """Stage in place of ShardSamples + SampleDecoder: shard URLs -> decoded samples, each
    shard read and decoded in full the first time it comes and served from `cache` after.
    Only under data.on_error: fail, where a bad shard or sample raises as it would streaming."""

    def __init__(self, shard_samples: ShardSamples, decoder: SampleDecoder, cache: dict):
        self.shard_samples, self.decoder, self.cache = shard_samples, decoder, cache

    def __call__(self, urls):
        for url in urls:
            decoded = self.cache.get(url)
            if decoded is None:
                decoded = self.cache[url] = list(self.decoder(self.shard_samples([url])))
            yield from decoded


class _AttachSkipped:
    """Last stage: each batch carries its reader's skipped-sample count across the worker boundary."""

    def __init__(self, log: ReadLog):
        self.log = log

    def __call__(self, batches):
        for batch in batches:
            batch[SKIPPED_KEY] = self.log.take()
            yield batch


def _collate(samples, kind: str = "image", with_keys: bool = False) -> dict:
    """The batch of one data kind, keyed as gentrain.registry.BATCH_KEYS says: {"image": float
    [B, C, H, W] in [0, 1], "label"} for images, {"tokens": int64 [B, T]} for text; BPE text
    adds "bytes" and "first_bytes" (int64 [B]: the UTF-8 bytes each sample and its first
    token stand for)."""
    tensors, labels, keys, counts = zip(*samples)
    stacked = torch.stack(tensors)
    if kind == "text":
        batch = {"tokens": stacked.to(torch.int64)}
        for name in counts[0]:
            batch[name] = torch.tensor([sample_counts[name] for sample_counts in counts], dtype=torch.int64)
    else:  # images: one float conversion per batch, not per sample, in numpy: on a small busy
        # machine waking torch's intra-op threads for it cost more than the conversion itself
        pixels = stacked.numpy().astype(np.float32)
        np.divide(pixels, np.float32(255.0), out=pixels)
        batch = {"image": torch.from_numpy(pixels),
                 "label": torch.tensor(labels, dtype=torch.int64)}
    if with_keys:
        batch["key"] = list(keys)
    return batch


def _check_ranks(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataConfigError(f"rank {rank} is not in [0, world_size {world_size})")
    if batch_size < 1:
        raise DataConfigError(f"batch_size must be at least 1, got {batch_size}")


def _check_epoch_samples(epoch_samples: int | None, resampled: bool) -> None:
    if epoch_samples is None:
        return
    if not resampled:
        raise DataConfigError(
            f"data.epoch_samples: {epoch_samples} only applies with data.resampled: true (exact epochs are "
            "the split's size); set data.resampled: true or remove data.epoch_samples"
        )
    if isinstance(epoch_samples, bool) or not isinstance(epoch_samples, int) or epoch_samples < 1:
        raise DataConfigError(f"data.epoch_samples: {epoch_samples!r} must be a whole number >= 1")


def _check_enough_data(index, split, batch_size, world_size, loader_workers, per_epoch, resampled, epoch_samples):
    shard_count = len(index.split(split).shards)
    if per_epoch == 0 and resampled and epoch_samples is not None:
        raise DataConfigError(
            f"data.epoch_samples: {epoch_samples} is fewer than batch_size {batch_size} x world_size "
            f"{world_size} = {batch_size * world_size}, so no rank gets a full batch: raise data.epoch_samples "
            "or lower train.batch_size"
        )
    if per_epoch == 0 or shard_count == 0:
        raise DataConfigError(
            f"split {split!r} of {index.location} has {index.total(split)} samples, fewer than "
            f"batch_size {batch_size} x world_size {world_size} = {batch_size * world_size}, so no rank gets a "
            "full batch: lower train.batch_size or use fewer workers (scaling.num_workers)"
        )
    readers = world_size * max(1, loader_workers)
    if not resampled and shard_count < readers:
        raise DataConfigError(
            f"split {split!r} of {index.location} has {shard_count} shards, but world_size {world_size} x "
            f"loader_workers {loader_workers} = {readers} readers need at least one shard each: repack with "
            "more shards (`gentrain data pack SOURCE --out DIR --per-shard N` with a smaller N), use fewer "
            "workers (data.loader_workers, scaling.num_workers), or set data.resampled: true"
        )
