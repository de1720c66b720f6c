"""Packing, indexing and per-rank batching on real shards in tmp_path.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_data.py -q
"""

import functools
import hashlib
import http.server
import json
import multiprocessing
import threading

import numpy as np
import pytest
import torch

from gentrain.data.index import IndexNotFoundError, load_index, resolve_builtin
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import DataConfigError, batches_per_epoch, eval_batches, train_batches
from gentrain.data.sources import UnknownSourceError, open_source

DIGITS_TOTAL = 1797


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    pack_source("digits", out, per_shard=100, progress=False)
    return out


@pytest.fixture(scope="module")
def digits(digits_dir):
    return load_index(str(digits_dir))


def read_all(index, split, rank=0, world_size=1, batch_size=64):
    keys, images, labels = [], [], []
    for batch in eval_batches(index, split, batch_size, rank, world_size):
        keys += batch["key"]
        images.append(batch["image"])
        labels.append(batch["label"])
    return keys, torch.cat(images), torch.cat(labels)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def same_batch(first, second):
    return torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])


def test_pack_writes_a_complete_index(digits_dir):
    raw = json.loads((digits_dir / "index.json").read_text())
    assert raw["source"] == "digits"
    assert raw["shape"] == [1, 8, 8] and raw["dtype"] == "uint8" and raw["encoding"] == "png"
    assert raw["num_classes"] == 10 and raw["class_names"] == [str(d) for d in range(10)]
    train, test = raw["splits"]["train"], raw["splits"]["test"]
    assert train["total"] + test["total"] == DIGITS_TOTAL
    assert test["total"] == 180  # round(1797 * 0.1)
    assert train["counts"] == [100] * 16 + [17] and train["shards"][0] == "train-000000.tar"
    digest = hashlib.sha256()
    for info in (train, test):
        assert sum(info["counts"]) == info["total"]
        for name in info["shards"]:
            digest.update((digits_dir / name).read_bytes())
    assert raw["content_hash"] == "sha256:" + digest.hexdigest()
    assert sorted(p.name for p in digits_dir.iterdir() if not p.name.endswith(".tar")) == ["index.json"]


def test_load_index_from_folder_or_file(digits_dir, digits):
    assert load_index(str(digits_dir / "index.json")) == digits
    assert digits.shape == (1, 8, 8) and digits.total("train") == 1617
    assert digits.shard_urls("test") == [str(digits_dir / "test-000000.tar"), str(digits_dir / "test-000001.tar")]
    with pytest.raises(KeyError, match="has no split 'valid'"):
        digits.shard_urls("valid")


@pytest.mark.parametrize("split", ["train", "test"])
def test_eval_round_trip_returns_every_sample_once(digits, split):
    keys, images, labels = read_all(digits, split)
    source = open_source("digits")
    assert keys == [f"{split}-{i:06d}" for i in range(source.count(split))]
    expected_images, expected_labels = zip(*source.samples(split))
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, np.stack(expected_images))
    assert labels.dtype == torch.int64 and labels.tolist() == list(expected_labels)


def test_eval_shares_of_two_ranks_are_disjoint_and_complete(digits):
    rank0, _, _ = read_all(digits, "train", rank=0, world_size=2)
    rank1, _, _ = read_all(digits, "train", rank=1, world_size=2)
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == [f"train-{i:06d}" for i in range(1617)]


def test_train_batches_have_the_right_shape_and_range(small):
    batch = next(train_batches(small, "train", 32, rank=0, world_size=1, seed=0))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 1, 8, 8) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].max() > 0.5
    assert batch["label"].shape == (32,) and batch["label"].dtype == torch.int64
    assert 0 <= batch["label"].min() and batch["label"].max() <= 9


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_every_rank_yields_exactly_batches_per_epoch(small, loader_workers):
    per_epoch = batches_per_epoch(small, "train", 10, world_size=2)
    assert per_epoch == 180 // 20
    for rank in (0, 1):
        run = dict(split="train", batch_size=10, rank=rank, world_size=2, seed=3, loader_workers=loader_workers)
        two_epochs = take(train_batches(small, **run), per_epoch + 1)
        next_epoch = next(train_batches(small, start_epoch=1, **run))
        # Epoch 1 begins right after exactly `per_epoch` batches of epoch 0, on both ranks.
        assert same_batch(two_epochs[per_epoch], next_epoch)


def test_a_rank_short_of_samples_wraps_around_its_own_shards(small):
    # 9 shards of 20 dealt to 2 ranks: one rank holds 4 shards (80 samples), yet
    # each rank needs 10 batches x 9 = 90 samples per epoch.
    per_epoch = batches_per_epoch(small, "train", 9, world_size=2)
    assert per_epoch * 9 > 80
    for rank in (0, 1):
        run = dict(split="train", batch_size=9, rank=rank, world_size=2, seed=0)
        batches = take(train_batches(small, **run), per_epoch + 1)
        assert all(batch["label"].shape == (9,) for batch in batches)
        assert same_batch(batches[per_epoch], next(train_batches(small, start_epoch=1, **run)))


def test_seed_and_epoch_decide_the_order(small):
    def first(**kw):
        return next(train_batches(small, "train", 32, rank=0, world_size=1, **kw))

    assert same_batch(first(seed=0), first(seed=0))
    assert not same_batch(first(seed=0), first(seed=0, start_epoch=1))
    assert not same_batch(first(seed=0), first(seed=1))


def test_start_batch_resumes_at_the_same_batch(small):
    per_epoch = batches_per_epoch(small, "train", 16, world_size=1)
    run = dict(split="train", batch_size=16, rank=0, world_size=1, seed=0)
    reference = take(train_batches(small, **run), per_epoch + 2)
    assert same_batch(next(train_batches(small, start_batch=5, **run)), reference[5])
    assert same_batch(next(train_batches(small, start_batch=per_epoch + 1, **run)), reference[per_epoch + 1])


def test_unknown_source_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownSourceError, match="unknown data source 'cifar99'.*digits, mnist5k"):
        pack_source("cifar99", tmp_path, progress=False)
    with pytest.raises(UnknownSourceError, match="builtin:digits, builtin:mnist5k"):
        resolve_builtin("builtin:cifar99", tmp_path)


def test_too_few_shards_says_to_repack(digits):
    # The test split has 2 shards: 2 ranks x 2 loader workers need 4.
    with pytest.raises(DataConfigError, match=r"2 shards.*4 readers.*--per-shard.*fewer workers"):
        train_batches(digits, "test", 8, rank=0, world_size=2, seed=0, loader_workers=2)


def test_batch_too_large_for_the_split_names_batch_size(digits):
    with pytest.raises(DataConfigError, match=r"batch_size 1000 x world_size 2.*train.batch_size"):
        train_batches(digits, "train", 1000, rank=0, world_size=2, seed=0)


def test_missing_index_says_how_to_pack(tmp_path):
    with pytest.raises(IndexNotFoundError, match=r"gentrain data pack SOURCE --out") as error:
        load_index(str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)


def test_repack_is_reproducible_and_leaves_no_stale_shards(tmp_path, digits):
    first = pack_source("digits", tmp_path, per_shard=100, progress=False)
    assert first["content_hash"] == digits.content_hash  # same source, same bytes
    again = pack_source("digits", tmp_path, per_shard=400, progress=False)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == again["splits"]["train"]["shards"]
    assert len(again["splits"]["train"]["shards"]) == 5


def test_resolve_builtin_packs_once_and_reuses(tmp_path, monkeypatch):
    assert resolve_builtin("/data/somewhere") == "/data/somewhere"
    monkeypatch.setenv("GENTRAIN_CACHE", str(tmp_path))
    folder = resolve_builtin("builtin:digits")  # the default cache comes from $GENTRAIN_CACHE
    index_file = tmp_path / "digits" / "index.json"
    assert folder == str(tmp_path / "digits") and index_file.is_file()
    stamp = index_file.stat().st_mtime_ns
    assert resolve_builtin("builtin:digits", tmp_path) == folder
    assert index_file.stat().st_mtime_ns == stamp
    assert load_index(folder).total("train") == 1617


def _resolve_in_child(cache_dir):
    resolve_builtin("builtin:digits", cache_dir)


def test_resolve_builtin_packs_once_across_processes(tmp_path, capfd):
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_resolve_in_child, args=(str(tmp_path),)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert capfd.readouterr().err.count("pack digits: loading") == 1


@pytest.fixture
def http_folder(digits_dir):
    handler = functools.partial(_QuietHandler, directory=str(digits_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_index_and_shards_stream_over_http(http_folder, digits):
    remote = load_index(http_folder + "/")
    assert remote.content_hash == digits.content_hash
    assert remote.shard_urls("test")[0] == http_folder + "/test-000000.tar"
    keys, _, _ = read_all(remote, "test")
    assert len(keys) == 180
    with pytest.raises(IndexNotFoundError, match="gentrain data pack SOURCE --out"):
        load_index(http_folder + "/nowhere")


def test_mnist5k_packs_28x28_digits(tmp_path):
    index = pack_source("mnist5k", tmp_path, per_shard=1000, progress=False)
    assert index["shape"] == [1, 28, 28] and index["num_classes"] == 10
    assert index["splits"]["train"]["total"] + index["splits"]["test"]["total"] == 5000
    batch = next(eval_batches(load_index(str(tmp_path)), "test", 16, rank=0, world_size=1))
    assert batch["image"].shape == (16, 1, 28, 28)
