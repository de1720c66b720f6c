"""Which checkpoint folders are trusted (gentrain.checkpoint), without Ray: a folder is
used only when its metadata is present and consistent, every listed file has its size
and sha256, and the model file loads; newer bad ones are named with what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from gentrain.checkpoint import (META_FILE, MODEL_FILE, RAY_SNAPSHOT_FILE, checkpoint_problem,
                                 file_manifest, forget_ray_snapshot, newest_good_checkpoint,
                                 step_dir_name, write_meta)


def make_checkpoint(run_dir, step: int, extra_files: dict[str, bytes] | None = None):
    folder = run_dir / step_dir_name(step)
    (folder / "vae").mkdir(parents=True)
    torch.save({"networks": {"vae": {"w": torch.full((64,), float(step))}}, "ema": {}}, folder / MODEL_FILE)
    (folder / "vae" / "shard_0.pt").write_bytes(b"optimizer state %d" % step)
    for name, data in (extra_files or {}).items():
        (folder / name).write_bytes(data)
    write_meta(str(folder), {"step": step, "batches_consumed": step * 2, "files": file_manifest(folder)})
    return folder


def test_a_complete_folder_is_trusted_and_lists_every_file(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    assert checkpoint_problem(folder) is None
    files = json.loads((folder / META_FILE).read_text())["files"]
    assert set(files) == {MODEL_FILE, "vae/shard_0.pt"}  # nested shards too; not the metadata itself
    assert files[MODEL_FILE]["bytes"] == (folder / MODEL_FILE).stat().st_size
    assert len(files[MODEL_FILE]["sha256"]) == 64


def test_missing_metadata_is_never_used(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    (folder / META_FILE).unlink()
    assert "no gentrain.json" in checkpoint_problem(folder)


def test_truncated_file_names_its_sizes(tmp_path):
    folder = make_checkpoint(tmp_path, 600)
    model = folder / MODEL_FILE
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:100])
    assert checkpoint_problem(folder) == f"model.pt is 100 bytes, expected {size:,} (truncated?)"


def test_same_size_other_bytes_fails_the_hash(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    shard = folder / "vae" / "shard_0.pt"
    shard.write_bytes(b"x" * shard.stat().st_size)
    assert "vae/shard_0.pt has the right size but the wrong sha256" in checkpoint_problem(folder)


def test_listed_file_missing(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    (folder / "vae" / "shard_0.pt").unlink()
    assert checkpoint_problem(folder) == "vae/shard_0.pt is missing (listed in gentrain.json)"


@pytest.mark.parametrize("meta, expected", [
    ({"step": 4, "batches_consumed": 8}, "lacks files"),
    ({"step": 8, "batches_consumed": 8, "files": {}}, "says step 8, the folder's name says 4"),
    ({"batches_consumed": 8, "files": {}}, "lacks step"),
])
def test_inconsistent_metadata(tmp_path, meta, expected):
    folder = make_checkpoint(tmp_path, 4)
    write_meta(str(folder), meta)
    assert expected in checkpoint_problem(folder)


def test_unparsable_metadata(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    (folder / META_FILE).write_text('{"step": 4, "batc')
    assert "gentrain.json is unreadable" in checkpoint_problem(folder)


def test_model_that_does_not_load(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    (folder / MODEL_FILE).write_bytes(b"not a zip archive at all")
    write_meta(str(folder), {"step": 4, "batches_consumed": 8, "files": file_manifest(folder)})
    assert checkpoint_problem(folder).startswith("model.pt does not load")


def test_newest_good_falls_back_and_names_each_newer_bad_one(tmp_path):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 8)
    (make_checkpoint(tmp_path, 12) / META_FILE).unlink()
    half = make_checkpoint(tmp_path, 16)
    (half / MODEL_FILE).write_bytes((half / MODEL_FILE).read_bytes()[:50])
    choice = newest_good_checkpoint(str(tmp_path))
    assert choice.folder.name == step_dir_name(8) and choice.step == 8
    assert choice.meta["batches_consumed"] == 16
    lines = choice.rejection_lines()
    assert [line.split(":")[0] for line in lines] == ["not using step-00000016", "not using step-00000012"]
    assert "(truncated?)" in lines[0] and "no gentrain.json" in lines[1]
    assert all(line.endswith("falling back to step-00000008") for line in lines)


def test_nothing_good_starts_from_zero(tmp_path):
    (make_checkpoint(tmp_path, 4) / META_FILE).unlink()
    choice = newest_good_checkpoint(str(tmp_path))
    assert choice.folder is None and choice.step == 0
    assert choice.rejection_lines()[0].endswith("falling back to the start (step 0)")
    assert newest_good_checkpoint(str(tmp_path / "absent")).folder is None


def test_ray_snapshot_is_dropped_on_local_storage_only(tmp_path):
    (tmp_path / RAY_SNAPSHOT_FILE).write_text("{}")
    assert forget_ray_snapshot(str(tmp_path)) and not (tmp_path / RAY_SNAPSHOT_FILE).exists()
    assert not forget_ray_snapshot(str(tmp_path))
    assert not forget_ray_snapshot("s3://bucket/runs/x")


def test_engine_never_loads_weights_without_their_step_and_data_position(tmp_path):
    import gentrain
    from gentrain.engine import Engine

    spec = gentrain.load("vae/debug", ["train.steps=3", "train.schedule.warmup_steps=2", "checkpoint.every=3",
                                       "eval.every=0", "eval.num_samples=4", "eval.max_batches=1",
                                       f"storage_path={tmp_path}", "tracking.enabled=false"])
    Engine(spec, print_fn=None).fit()
    folder = tmp_path / spec.name / step_dir_name(3)
    assert checkpoint_problem(folder) is None  # what Engine.save writes passes
    (folder / META_FILE).unlink()
    fresh = Engine(spec, print_fn=None)
    before = {k: v.clone() for k, v in fresh.strategy.export_state_dicts()["vae"].items()}
    with pytest.raises(ValueError, match="not a usable checkpoint: no gentrain.json"):
        fresh.restore(folder)
    assert fresh.step == 0 and not fresh.resumed
    for key, value in fresh.strategy.export_state_dicts()["vae"].items():
        assert torch.equal(value, before[key]), key  # nothing was loaded
