"""gentrain.tracking.lineage and the model's requirements, without a server: run tags, git
state, the launcher, the data sets a run is told apart by."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from importlib import metadata

import pytest

from gentrain.data.index import default_cache_dir, load_index, resolve_builtin
from gentrain.tracking.lineage import (
    GIT_COMMIT_ENV, GIT_DIRTY_ENV, RAY_JOB_ENV, dataset_digest, dataset_entities, git_env,
    git_state, launcher, run_tags,
)
from gentrain.validation import load_spec


def git(folder, *args):
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "spec.yaml").write_text("a: 1\n")
    git(tmp_path, "add", "spec.yaml")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_git_state_is_the_commit_and_whether_tracked_files_changed(repo, tmp_path_factory):
    head = git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == (head, False)
    (repo / "notes.txt").write_text("untracked files do not make it dirty")
    assert git_state(repo) == (head, False)
    (repo / "spec.yaml").write_text("a: 2\n")
    assert git_state(repo) == (head, True)
    assert git_env(repo) == {GIT_COMMIT_ENV: head, GIT_DIRTY_ENV: "true"}
    outside = tmp_path_factory.mktemp("not-a-repo")
    assert git_state(outside) is None and git_env(outside) == {}


def test_launcher_says_local_cluster_or_submitted_job(monkeypatch):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launcher() == ("local", None)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # the Jobs API: still a local run
    assert launcher() == ("local", None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert launcher() == ("ray-cluster", None)
    monkeypatch.setenv(RAY_JOB_ENV, "gentrain-vae-1234")
    assert launcher() == ("ray-job", "gentrain-vae-1234")


def test_run_tags_name_what_users_filter_on(monkeypatch, repo):
    monkeypatch.chdir(repo)
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    monkeypatch.setenv(RAY_JOB_ENV, "gentrain-job-7")
    spec = load_spec("vae/debug", ["strategy.name=deepspeed", "strategy.zero_stage=2",
                                   "strategy.precision=bf16", "scaling.num_workers=3"])
    tags = run_tags(spec)
    assert {key: tags[key] for key in (
        "gentrain.job_type", "gentrain.strategy", "gentrain.zero_stage", "gentrain.precision",
        "gentrain.world_size", "gentrain.launcher", "gentrain.ray_job_id",
        "mlflow.source.git.commit", "gentrain.git.dirty")} == {
        "gentrain.job_type": "vae", "gentrain.strategy": "deepspeed", "gentrain.zero_stage": "2",
        "gentrain.precision": "bf16", "gentrain.world_size": "3", "gentrain.launcher": "ray-job",
        "gentrain.ray_job_id": "gentrain-job-7",
        "mlflow.source.git.commit": git(repo, "rev-parse", "HEAD"), "gentrain.git.dirty": "false"}
    assert tags["gentrain.version"] == metadata.version("gentrain")
    # A submitted job's working folder has no .git: the submitting machine's commit wins.
    monkeypatch.setenv(GIT_COMMIT_ENV, "f" * 40)
    monkeypatch.setenv(GIT_DIRTY_ENV, "true")
    tags = run_tags(load_spec("vae/debug"))
    assert tags["mlflow.source.git.commit"] == "f" * 40 and tags["gentrain.git.dirty"] == "true"
    assert "gentrain.zero_stage" not in tags  # ddp has none


def test_dataset_inputs_carry_the_index_hash_counts_and_context():
    spec = load_spec("vae/debug")
    index = load_index(resolve_builtin("builtin:digits", default_cache_dir()))
    inputs = dataset_entities(spec, index)
    assert [(item.dataset.name, item.tags[0].value) for item in inputs] == [
        ("digits/train", "training"), ("digits/test", "evaluation")]
    hex_digest = index.content_hash.split(":")[-1]
    for item, split in zip(inputs, ("train", "test")):
        assert item.dataset.digest == hex_digest[:36]
        profile = json.loads(item.dataset.profile)
        assert profile["samples"] == index.splits[split].total
        assert profile["shards"] == len(index.splits[split].shards)
        assert profile["content_hash"] == index.content_hash
        assert json.loads(item.dataset.source)["uri"] == index.location
        assert json.loads(item.dataset.schema)["shape"] == list(index.shape)
    other = dataclasses.replace(index, content_hash="sha256:" + "0" * 64)
    assert dataset_entities(spec, other)[0].dataset.digest != inputs[0].dataset.digest
    assert dataset_digest("abc") == "abc" and len(dataset_digest("sha256:" + "1" * 64)) == 36


def test_model_requirements_pin_gentrain_and_what_inference_imports():
    from gentrain.tracking.model import requirements

    pins = dict(line.split("==") for line in requirements())
    assert pins["gentrain"] == metadata.version("gentrain")
    declared = {req.split("==")[0].split("[")[0].lower(): req.split("==")[1]
                for req in metadata.requires("gentrain") if "==" in req and "extra" not in req}
    for name in ("torch", "numpy", "mlflow", "pyyaml", "pillow"):
        assert pins[name] == declared[name]
    assert not {"ray", "deepspeed", "accelerate"} & set(pins)


def test_model_input_rows_become_sample_requests():
    import pandas as pd

    from gentrain.tracking.model import _requests

    assert _requests({"n": 4, "seed": 3}) == [(4, 3, None)]
    assert _requests({"n": 2}) == [(2, 0, None)]
    frame = pd.DataFrame({"n": [2, 1], "seed": [5, 6], "labels": [[0, 1], None]})
    assert _requests(frame) == [(2, 5, [0, 1]), (1, 6, None)]
    with pytest.raises(ValueError, match="2 labels for n=3"):
        _requests({"n": 3, "labels": [0, 1]})
    with pytest.raises(ValueError, match="`n`"):
        _requests({"seed": 1})
