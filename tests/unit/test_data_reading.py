"""The reading side on real shards in tmp_path: resume, drop policy, augmentation,
resampled epochs, brace patterns and the refusal of unsafe shard names.

    .venv/bin/python -m pytest -q tests/unit/test_data_reading.py
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gentrain.data.augment import Augmentation
from gentrain.data.errors import DataConfigError, ShardReadError, UnsafeURLError
from gentrain.data.index import IndexNotFoundError, load_index
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import batches_per_epoch, eval_batches, train_batches
from gentrain.data.reader import npy_array, tar_samples


@pytest.fixture(scope="module")
def even_dir(tmp_path_factory):
    """160 train samples in 8 shards of 20: every rank and worker holds the same count."""
    out = tmp_path_factory.mktemp("even")
    pack_source("digits", out, per_shard=20, test_fraction=1 - 160 / 1797, progress=False)
    return out


def epoch_keys(index, rank, world_size, batch_size, count, **kw):
    keys = []
    batches = train_batches(index, "train", batch_size, rank, world_size, seed=5, with_keys=True, **kw)
    for batch in _take(batches, count):
        keys += batch["key"]
    return keys


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def rewrite_index(folder, **split_changes):
    """Copy-free edit of a packed folder's index.json train split (the shards stay)."""
    raw = json.loads((folder / "index.json").read_text())
    raw["splits"]["train"].update(split_changes)
    (folder / "index.json").write_text(json.dumps(raw))


# -- resume and the drop policy ---------------------------------------------------------


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_restart_mid_epoch_sees_the_same_samples_as_one_uninterrupted_epoch(small, loader_workers):
    batch_size, world_size = 10, 2
    per_epoch = batches_per_epoch(small, "train", batch_size, world_size)
    consumed = 4  # batches each rank trained on before the "crash"
    for rank in (0, 1):
        run = dict(index=small, rank=rank, world_size=world_size, batch_size=batch_size,
                   loader_workers=loader_workers)
        uninterrupted = epoch_keys(count=per_epoch, **run)
        before = epoch_keys(count=consumed, **run)
        after = epoch_keys(count=per_epoch - consumed, start_batch=consumed, **run)
        assert Counter(before + after) == Counter(uninterrupted)
        assert before + after == uninterrupted  # the same order, too
        assert len(uninterrupted) == per_epoch * batch_size


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_within_an_epoch_no_sample_is_seen_twice_when_shards_divide_evenly(even_dir, loader_workers):
    index = load_index(str(even_dir))
    per_epoch = batches_per_epoch(index, "train", 10, world_size=2)
    assert per_epoch == 8
    ranks = [epoch_keys(index, rank, 2, 10, per_epoch, loader_workers=loader_workers) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(f"train-{i:06d}" for i in range(160))


def test_drop_policy_short_rank_wraps_long_rank_drops_never_across_ranks(small):
    # 9 shards of 20 between 2 ranks: one rank holds 5 (100 samples), the other 4 (80),
    # and each yields 180 // 20 = 9 batches of 10 = 90 samples.
    per_epoch = batches_per_epoch(small, "train", 10, world_size=2)
    ranks = [epoch_keys(small, rank, 2, 10, per_epoch) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])  # never a sample on two ranks
    distinct = sorted(len(set(keys)) for keys in ranks)
    assert distinct == [80, 90]  # the short rank re-reads 10 of its own; the long one drops 10
    assert sorted(len(keys) - len(set(keys)) for keys in ranks) == [0, 10]


def test_resume_across_an_epoch_boundary(small):
    run = dict(index=small, rank=1, world_size=2, batch_size=10)
    per_epoch = batches_per_epoch(small, "train", 10, world_size=2)
    two_epochs = epoch_keys(count=2 * per_epoch, **run)
    resumed = epoch_keys(count=per_epoch - 2, start_batch=per_epoch + 2, **run)
    assert resumed == two_epochs[(per_epoch + 2) * 10 :]


# -- augmentation -------------------------------------------------------------------------


def test_flip_mirrors_some_images_and_keeps_the_others(small):
    run = dict(split="train", batch_size=64, rank=0, world_size=1, seed=0, with_keys=True)
    plain = next(train_batches(small, **run))
    flipped = next(train_batches(small, augment=Augmentation(flip=True), **run))
    assert flipped["key"] == plain["key"] and torch.equal(flipped["label"], plain["label"])
    same = [torch.equal(a, b) for a, b in zip(flipped["image"], plain["image"])]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped["image"], plain["image"])]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(m and not s for s, m in zip(same, mirrored)) < 54


def test_crop_padding_shifts_each_image_within_the_padding(small):
    run = dict(split="train", batch_size=32, rank=0, world_size=1, seed=0)
    plain = next(train_batches(small, **run))["image"]
    cropped = next(train_batches(small, augment=Augmentation(crop_padding=2), **run))["image"]
    padded = F.pad(plain, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(plain)):
        matches = [(top, left) for top in range(5) for left in range(5)
                   if torch.equal(cropped[i], padded[i, :, top : top + 8, left : left + 8])]
        assert matches, f"image {i} is not a crop of its padded original"
        offsets.add(matches[0])
    assert len(offsets) > 3  # not one shift for the whole batch


def test_augmentation_is_seeded_and_resumes_exactly(small):
    augment = Augmentation(flip=True, crop_padding=1)
    run = dict(split="train", batch_size=16, rank=0, world_size=1, seed=3, augment=augment, loader_workers=2)
    first = _take(train_batches(small, **run), 6)
    again = _take(train_batches(small, **run), 6)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    resumed = next(train_batches(small, start_batch=5, **run))
    assert torch.equal(resumed["image"], first[5]["image"])
    other_epoch = next(train_batches(small, start_epoch=1, **run))
    assert not torch.equal(other_epoch["image"], first[0]["image"])


def test_crop_padding_must_be_a_whole_number():
    with pytest.raises(DataConfigError, match=r"data.augment.crop_padding: -1"):
        Augmentation(crop_padding=-1)


# -- resampled epochs -----------------------------------------------------------------------


def test_resampled_epoch_length_comes_from_epoch_samples(small):
    assert batches_per_epoch(small, "train", 10, 2, epoch_samples=100) == 5
    run = dict(split="train", batch_size=10, world_size=2, seed=1, resampled=True, epoch_samples=100)
    for rank in (0, 1):
        batches = _take(train_batches(small, rank=rank, **run), 6)
        next_epoch = next(train_batches(small, rank=rank, start_epoch=1, **run))
        assert torch.equal(batches[5]["image"], next_epoch["image"])


def test_resampled_draws_shards_with_replacement_and_is_seeded(small):
    run = dict(split="train", batch_size=20, rank=0, world_size=1, resampled=True, with_keys=True,
               shuffle_buffer=0)
    shards = [batch["key"][0][:-2] for batch in _take(train_batches(small, seed=0, **run), 40)]
    assert Counter(shards).most_common(1)[0][1] > 1  # 40 draws of 9 shards: some repeat
    same = [batch["key"][0][:-2] for batch in _take(train_batches(small, seed=0, **run), 40)]
    other = [batch["key"][0][:-2] for batch in _take(train_batches(small, seed=1, **run), 40)]
    assert same == shards and other != shards


def test_resampled_needs_no_shard_per_reader(small_dir):
    index = load_index(str(small_dir))
    # 9 shards for 2 ranks x 8 workers would be refused in exact mode...
    with pytest.raises(DataConfigError, match=r"9 shards.*16 readers.*data.resampled: true"):
        train_batches(index, "train", 10, rank=0, world_size=2, seed=0, loader_workers=8)
    # ...but every resampled reader draws from all of them.
    batches = train_batches(index, "train", 10, rank=1, world_size=2, seed=0, loader_workers=2, resampled=True)
    assert next(batches)["image"].shape == (10, 1, 8, 8)


def test_epoch_samples_without_resampled_names_the_fix(small):
    with pytest.raises(DataConfigError, match=r"data.epoch_samples: 100 only applies with data.resampled: true"):
        train_batches(small, "train", 10, rank=0, world_size=1, seed=0, epoch_samples=100)
    with pytest.raises(DataConfigError, match=r"data.epoch_samples: 15 is fewer than.*= 20"):
        train_batches(small, "train", 10, rank=0, world_size=2, seed=0, resampled=True, epoch_samples=15)


def test_on_error_must_be_fail_or_skip(small):
    with pytest.raises(DataConfigError, match=r"data.on_error: 'ignore' is not one of 'fail', 'skip'"):
        train_batches(small, "train", 10, rank=0, world_size=1, seed=0, on_error="ignore")


# -- shard names, patterns and pipes ----------------------------------------------------------


@pytest.fixture
def folder(small_dir, tmp_path):
    """A private copy of the small pack, free to edit."""
    return shutil.copytree(small_dir, tmp_path / "data")


def test_index_may_list_shards_as_a_brace_pattern(folder, small):
    rewrite_index(folder, shards=["train-{000000..000008}.tar"])
    patterned = load_index(str(folder))
    assert [url.rsplit("/", 1)[1] for url in patterned.shard_urls("train")] == list(small.split("train").shards)
    batch = next(eval_batches(patterned, "train", 180, rank=0, world_size=1))
    assert batch["key"] == [f"train-{i:06d}" for i in range(180)]


def test_a_bare_shard_pattern_as_source_asks_for_the_index(folder):
    with pytest.raises(IndexNotFoundError, match=r"is a shard pattern.*index.json.*exact epochs"):
        load_index(f"{folder}/train-{{000000..000008}}.tar")


@pytest.mark.parametrize("name, problem", [
    ("../elsewhere/train-000000.tar", "climbs out of the index's folder"),
    ("/etc/train-000000.tar", "is an absolute path"),
    ("http://example.invalid/train-000000.tar", "is a URL of its own"),
    ("pipe:cat train-000000.tar", "is a pipe: command"),
])
def test_index_shard_names_must_stay_in_its_folder(folder, name, problem):
    shards = json.loads((folder / "index.json").read_text())["splits"]["train"]["shards"]
    rewrite_index(folder, shards=[name] + shards[1:])
    with pytest.raises(UnsafeURLError, match=problem) as error:
        load_index(str(folder))
    assert "data.allow_pipe: true" in str(error.value) and "gentrain data pack" in str(error.value)


def test_pipe_shards_run_only_when_the_spec_allows_them(folder, small):
    shards = json.loads((folder / "index.json").read_text())["splits"]["train"]["shards"]
    rewrite_index(folder, shards=[f"pipe:cat {folder / name}" for name in shards])
    trusted = load_index(str(folder), allow_pipe=True)
    with pytest.raises(UnsafeURLError, match=r"pipe: URL.*data.allow_pipe: true"):
        eval_batches(trusted, "train", 60, rank=0, world_size=1)  # refused before anything runs
    with pytest.raises(UnsafeURLError, match=r"data.allow_pipe: true"):
        train_batches(trusted, "train", 10, rank=0, world_size=1, seed=0)
    piped = next(eval_batches(trusted, "train", 60, rank=0, world_size=1, allow_pipe=True))
    local = next(eval_batches(small, "train", 60, rank=0, world_size=1))
    assert piped["key"] == local["key"] and torch.equal(piped["image"], local["image"])


def test_a_pipe_as_data_source_is_refused():
    with pytest.raises(UnsafeURLError, match="data.source"):
        load_index("pipe:curl -s http://example.invalid/index.json")


def test_every_shard_bad_under_skip_is_an_error_not_a_hang(folder):
    for shard in folder.glob("train-*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    index = load_index(str(folder))
    with pytest.warns(UserWarning, match="skipped shard"):
        with pytest.raises(ShardReadError, match=r"every one of the \d+ shards.*at least one readable shard"):
            next(train_batches(index, "train", 10, rank=0, world_size=2, seed=0, on_error="skip"))


@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(6, dtype=">i4").reshape(3, 2),
    np.zeros((0, 5), dtype=np.float32),
], ids=["uint8", "fortran-float64", "big-endian", "empty"])
def test_npy_samples_read_as_np_load_reads_them_twice_in_a_row(array):
    """The second read takes the parsed-header path: the same array, writable and C-ordered."""
    stream = io.BytesIO()
    np.save(stream, array)
    for _ in range(2):
        read = npy_array(stream.getvalue())
        expected = np.load(io.BytesIO(stream.getvalue()), allow_pickle=False)
        assert read.dtype == expected.dtype and read.shape == expected.shape and np.array_equal(read, expected)
        assert read.flags.writeable and read.flags.c_contiguous


def test_npy_samples_of_objects_or_cut_short_are_refused():
    stream = io.BytesIO()
    np.save(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="never unpickled"):
        npy_array(stream.getvalue())
    stream = io.BytesIO()
    np.save(stream, np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match="truncated"):
        npy_array(stream.getvalue()[:-8])


def _tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_samples_group_adjacent_files_by_key_as_webdataset_does():
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = [("__meta__", b"{}"), ("a/0001.png", b"p1"), ("a/0001.CLS", b"3"), ("0002.png", b"p2"),
             ("0002.seg.png", b"s2"), ("noextension", b"x"), ("0003.cls", b"1")]
    ours = list(tar_samples(io.BytesIO(_tar_bytes(files)), "shard.tar"))
    theirs = list(group_by_keys(tar_file_expander([{"url": "shard.tar", "stream": io.BytesIO(_tar_bytes(files))}])))
    assert ours == theirs
    assert [sample["__key__"] for sample in ours] == ["a/0001", "0002", "0003"]
    assert ours[0]["cls"] == b"3" and ours[1]["seg.png"] == b"s2"


def test_tar_samples_refuse_a_repeated_entry():
    with pytest.raises(ValueError, match="two 'png' files"):
        list(tar_samples(io.BytesIO(_tar_bytes([("0001.png", b"a"), ("0001.PNG", b"b")])), "shard.tar"))


class _Unseekable(io.RawIOBase):
    """A pipe's view of bytes: read only, no seek (curl's stdout)."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        chunk = self._data.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_tar_samples_read_a_file_a_stream_and_a_compressed_tar_alike(tmp_path):
    """A local uncompressed tar is read with random access, a pipe or a gzip-compressed tar
    as a stream: the same samples, and a tar cut short is an error either way."""
    import gzip

    files = [(f"{i:04d}.{entry}", f"{entry}{i}".encode()) for i in range(5) for entry in ("png", "cls")]
    data = _tar_bytes(files)
    (tmp_path / "shard.tar").write_bytes(data)
    with open(tmp_path / "shard.tar", "rb") as local:
        expected = list(tar_samples(local, "shard.tar"))
    assert [s["png"] for s in expected] == [f"png{i}".encode() for i in range(5)]
    assert list(tar_samples(_Unseekable(data), "shard.tar")) == expected
    assert list(tar_samples(io.BytesIO(gzip.compress(data)), "shard.tar")) == expected
    cut = data[:512 * 5 + 100]  # inside the third file's data
    for stream in (io.BytesIO(cut), _Unseekable(cut)):
        with pytest.raises(tarfile.ReadError):
            list(tar_samples(stream, "shard.tar"))
