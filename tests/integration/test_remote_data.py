"""Reading shards from a real local HTTP server, from fsspec, and from bad shards.

    .venv/bin/python -m pytest -q tests/integration/test_remote_data.py
    .venv/bin/python -m pytest -q -m slow tests/integration/test_remote_data.py   # + one `gentrain run`

The server is Python's http.server on 127.0.0.1 in a thread; WebDataset fetches
http:// shards with `curl`, which must be installed (CI installs it). s3fs and
gcsfs are not installed here, so s3:// and gs:// are tested for the error that
names the extra; the fsspec streaming path itself runs against fsspec's
in-process memory:// store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import mlflow
import pytest
import torch

from gentrain.data.errors import MissingExtraError, ShardReadError
from gentrain.data.index import load_index
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import batches_per_epoch, eval_batches, train_batches

# The shard every bad-shard test spoils: 20 samples, train-000040 .. train-000059.
BAD = "train-000002.tar"
BAD_KEYS = {f"train-{i:06d}" for i in range(40, 60)}


@pytest.fixture(scope="module", autouse=True)
def curl_installed():
    if shutil.which("curl") is None:
        pytest.fail("WebDataset reads http:// shards with curl: install it (apt-get install curl)")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """180 train samples in 9 shards of 20, 1,617 test samples in 81 shards."""
    out = tmp_path_factory.mktemp("digits")
    pack_source("digits", out, per_shard=20, test_fraction=0.9, progress=False)
    return out


@pytest.fixture
def folder(packed, tmp_path):
    """A private copy of the pack, free to spoil."""
    return shutil.copytree(packed, tmp_path / "data")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(directory: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler,
                                                                                   directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def all_eval(index, split="train", rank=0, world_size=1, **kw):
    batches = eval_batches(index, split, 64, rank, world_size, **kw)
    keys, images = [], []
    for batch in batches:
        keys += batch["key"]
        images.append(batch["image"])
    return keys, torch.cat(images), batches.skipped_samples


def one_epoch(index, rank, world_size=2, batch_size=10, **kw):
    """(the epoch's batches, samples skipped) for one rank, keys included."""
    batches = train_batches(index, "train", batch_size, rank, world_size, seed=7, with_keys=True, **kw)
    per_epoch = batches_per_epoch(index, "train", batch_size, world_size)
    epoch = [next(batches) for _ in range(per_epoch)]
    return epoch, batches.skipped_samples


# -- http ------------------------------------------------------------------------------------


def test_train_and_eval_over_http_match_local_reading(packed):
    local = load_index(str(packed))
    with serving(packed) as url:
        remote = load_index(url)
        assert remote.shard_urls("train")[0] == f"{url}/train-000000.tar"
        for rank in (0, 1):
            local_keys, local_images, _ = all_eval(local, "test", rank, 2)
            remote_keys, remote_images, skipped = all_eval(remote, "test", rank, 2)
            assert remote_keys == local_keys and torch.equal(remote_images, local_images) and skipped == 0
            for workers in (0, 2):
                over_http, _ = one_epoch(remote, rank, loader_workers=workers)
                from_disk, _ = one_epoch(local, rank, loader_workers=workers)
                assert [b["key"] for b in over_http] == [b["key"] for b in from_disk]
                assert all(torch.equal(a["image"], b["image"]) for a, b in zip(over_http, from_disk))


def test_a_missing_shard_over_http_fails_fast_with_its_name(folder):
    with serving(folder) as url:
        index = load_index(url)
        (folder / BAD).unlink()
        started = time.monotonic()
        with pytest.raises(ShardReadError, match=rf"{url}/{BAD}: curl exited with status 22.*data.on_error: skip"):
            all_eval(index)
        with pytest.raises(ShardReadError, match=rf"{BAD}.*data.on_error: skip"):
            for rank in (0, 1):
                one_epoch(index, rank, loader_workers=2)
        assert time.monotonic() - started < 30


def test_a_missing_shard_over_http_is_skipped_and_counted(folder):
    with serving(folder) as url:
        index = load_index(url)
        (folder / BAD).unlink()
        with pytest.warns(UserWarning, match=rf"skipped shard {url}/{BAD} \(20 unread samples\)"):
            keys, _, skipped = all_eval(index, on_error="skip")
        assert skipped == 20 and len(keys) == 160 and not BAD_KEYS & set(keys)
        assert_training_goes_on(index, expected_skipped=20)


def assert_training_goes_on(index, expected_skipped):
    """Both ranks still yield a full epoch, and together they count every lost sample once."""
    per_epoch = batches_per_epoch(index, "train", 10, 2)
    total = 0
    with pytest.warns(UserWarning, match=BAD):
        for rank in (0, 1):
            epoch, skipped = one_epoch(index, rank, on_error="skip")
            assert len(epoch) == per_epoch and all(len(batch["key"]) == 10 for batch in epoch)
            total += skipped
    # 9 shards of 20 for 2 ranks x 90 samples: every rank reads all its shards each epoch.
    assert total == expected_skipped


# -- truncated and corrupt shards on local disk ------------------------------------------------


@pytest.mark.parametrize("cut", ["half", "mid_member"])
def test_a_truncated_shard_fails_with_its_name(folder, cut):
    shard = folder / BAD
    data = shard.read_bytes()
    # Half of a tar of 512-byte blocks ends cleanly between members (only the index's count
    # gives it away); 700 bytes later it ends inside a member's data.
    shard.write_bytes(data[: len(data) // 2 + (700 if cut == "mid_member" else 0)])
    index = load_index(str(folder))
    with pytest.raises(ShardReadError, match=rf"{shard}: .*data.on_error: skip"):
        all_eval(index)
    with pytest.warns(UserWarning, match="skipped shard"):
        keys, _, skipped = all_eval(index, on_error="skip")
    seen = BAD_KEYS & set(keys)
    assert 0 < len(seen) < 20 and len(seen) + skipped == 20 and len(keys) == 160 + len(seen)
    assert_training_goes_on(index, expected_skipped=20 - len(seen))


def test_a_shard_of_garbage_bytes_fails_or_is_skipped(folder):
    shard = folder / BAD
    shard.write_bytes(os.urandom(shard.stat().st_size))
    index = load_index(str(folder))
    with pytest.raises(ShardReadError, match=rf"cannot read shard {shard}: ReadError.*data.on_error: skip"):
        all_eval(index)
    with pytest.raises(ShardReadError, match=rf"{BAD}"):  # from a DataLoader worker, same class
        for rank in (0, 1):
            one_epoch(index, rank, loader_workers=2)
    with pytest.warns(UserWarning, match="skipped shard"):
        keys, _, skipped = all_eval(index, on_error="skip")
    assert skipped == 20 and not BAD_KEYS & set(keys)
    assert_training_goes_on(index, expected_skipped=20)


def test_an_undecodable_sample_names_its_key_and_shard(folder):
    shard = folder / BAD
    rewrite_member(shard, "train-000045.png", b"\x89PNG this is not an image")
    index = load_index(str(folder))
    with pytest.raises(ShardReadError, match=rf"sample 'train-000045' of shard {shard}"):
        all_eval(index)
    with pytest.warns(UserWarning, match="skipped sample 'train-000045'"):
        keys, _, skipped = all_eval(index, on_error="skip")
    assert skipped == 1 and len(keys) == 179 and "train-000045" not in keys


def rewrite_member(shard: Path, name: str, payload: bytes) -> None:
    with tarfile.open(shard) as source:
        members = [(member, source.extractfile(member).read()) for member in source]
    with tarfile.open(shard, "w") as target:
        for member, data in members:
            data = payload if member.name == name else data
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))


# -- object storage --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, extra, package", [("s3", "s3", "s3fs"), ("gs", "gcs", "gcsfs")])
def test_object_storage_without_its_package_names_the_extra(packed, scheme, extra, package):
    install = rf"needs the optional package {package}.*pip install 'gentrain\[{extra}\]'"
    with pytest.raises(MissingExtraError, match=install):
        load_index(f"{scheme}://bucket/digits")
    # An index whose shards live there is refused when the stream is built, not on first read.
    elsewhere = dataclasses.replace(load_index(str(packed)), location=f"{scheme}://bucket/digits")
    with pytest.raises(MissingExtraError, match=install):
        train_batches(elsewhere, "train", 10, rank=0, world_size=1, seed=0)
    with pytest.raises(MissingExtraError, match=install):
        eval_batches(elsewhere, "test", 10, rank=0, world_size=1)


@pytest.fixture
def in_memory(packed):
    """The pack copied into fsspec's memory:// store (the same code path as s3:// and gs://)."""
    memory = fsspec.filesystem("memory")
    for path in packed.iterdir():
        memory.pipe(f"/digits/{path.name}", path.read_bytes())
    yield memory
    memory.rm("/digits", recursive=True)


def test_fsspec_streams_index_and_shards(packed, in_memory):
    local, remote = load_index(str(packed)), load_index("memory://digits")
    assert remote.content_hash == local.content_hash
    assert remote.shard_urls("train")[0] == "memory://digits/train-000000.tar"
    assert all_eval(remote, "test")[0] == all_eval(local, "test")[0]
    over_fsspec, _ = one_epoch(remote, rank=1)
    from_disk, _ = one_epoch(local, rank=1)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(over_fsspec, from_disk))
    in_memory.rm(f"/digits/{BAD}")
    with pytest.raises(ShardReadError, match=rf"memory://digits/{BAD}: FileNotFoundError"):
        all_eval(remote)
    with pytest.warns(UserWarning, match="skipped shard"):
        assert all_eval(remote, on_error="skip")[2] == 20


# -- the training loop logs what was skipped ---------------------------------------------------


@pytest.mark.slow
def test_gentrain_run_skips_a_bad_shard_and_logs_it(folder, tmp_path, mlflow_server):
    (folder / BAD).write_bytes(os.urandom(4096))
    gentrain = str(Path(sys.executable).parent / "gentrain")
    overrides = [f"data.source={folder}", "data.on_error=skip", "train.steps=20", "train.log_every=10",
                 "train.batch_size=10", "train.schedule.warmup_steps=0", "checkpoint.every=20",
                 "eval.every=0", f"storage_path={tmp_path / 'runs'}", "tracking.experiment=skip"]
    result = subprocess.run([gentrain, "run", "vae/debug", *overrides], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "samples skipped" in result.stdout + result.stderr
    client = mlflow.MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("skip").experiment_id])[0]
    skipped = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "data/skipped_samples"))
    # 18 batches of 10 per epoch over 2 ranks = 9 steps: step 10 is in epoch 2, and each
    # epoch the rank holding the bad shard loses its 20 samples.
    assert [step for step, _ in skipped] == [10, 20]
    assert skipped[0][1] >= 20 and skipped[1][1] >= 40
