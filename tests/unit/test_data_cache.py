"""Small sets decoded once (data.cache_mb): the cached stream is the streamed one, batch for
batch, across epochs, ranks, resume offsets and augmentation; it is only used where it can be
(no loader workers, data.on_error: fail, the split fits)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gentrain.data.augment import Augmentation
from gentrain.data.index import load_index
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import _cacheable, decoded_bytes, train_batches


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-cache")
    pack_source("digits", out, per_shard=100, progress=False)
    return load_index(str(out))


def _take(index, count, cache_bytes, **kw):
    return list(itertools.islice(train_batches(index, "train", 32, seed=3, cache_bytes=cache_bytes, **kw), count))


def _same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_cached_stream_equals_the_streamed_one_over_epochs(digits, rank, world_size):
    per_epoch = digits.total("train") // (32 * world_size)
    count = 2 * per_epoch + 3  # into the third epoch: the cache serves every epoch after the first
    streamed = _take(digits, count, 0, rank=rank, world_size=world_size, with_keys=True)
    cached = _take(digits, count, 2**30, rank=rank, world_size=world_size, with_keys=True)
    _same(streamed, cached)


def test_cached_resume_and_augmentation_match_streaming(digits):
    augment = Augmentation(flip=True, crop_padding=1)
    streamed = _take(digits, 5, 0, rank=0, world_size=1, start_batch=40, augment=augment)
    cached = _take(digits, 5, 2**30, rank=0, world_size=1, start_batch=40, augment=augment)
    _same(streamed, cached)


def test_the_cache_is_used_only_where_it_can_be(digits):
    size = decoded_bytes(digits, "train")
    assert size == digits.total("train") * 1 * 8 * 8  # uint8 [1, 8, 8] per sample
    assert _cacheable(digits, "train", 0, "fail", size)
    assert not _cacheable(digits, "train", 0, "fail", size - 1)  # does not fit
    assert not _cacheable(digits, "train", 2, "fail", size)  # loader workers restart every epoch
    assert not _cacheable(digits, "train", 0, "skip", size)  # skips must be counted where they happen
    assert not _cacheable(digits, "train", 0, "fail", 0)  # data.cache_mb: 0
