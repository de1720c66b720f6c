"""Continuing a checkpoint on another world size and/or strategy (gloo, CPU): 2 workers -> 1 and
1 -> 2, DeepSpeed ZeRO 1/2/3 <-> DDP. After the restore the weights and the optimizer state of
every parameter, gathered again from the new layout, equal what was saved, exactly; the resume
names the change; the data continues from the saved global position; a step then runs.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/distributed/test_reshard.py -q
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from harness import run_world

SECTIONS = {"ddp": {"name": "ddp"}, "accelerate": {"name": "accelerate"},
            "zero1": {"name": "deepspeed", "zero_stage": 1}, "zero2": {"name": "deepspeed", "zero_stage": 2},
            "zero3": {"name": "deepspeed", "zero_stage": 3},
            "zero3-bf16": {"name": "deepspeed", "zero_stage": 3, "precision": "bf16"}, "fsdp": {"name": "fsdp"}}
# (saved, continued) strategies; CI's share, and the rest with --full-matrix.
TO_1 = [("zero3", "ddp"), ("ddp", "zero3"), ("fsdp", "ddp")]
TO_2 = [("ddp", "zero1"), ("zero3", "zero2"), ("ddp", "fsdp")]
FULL_TO_1 = [("zero3-bf16", "ddp"), ("zero2", "accelerate"), ("zero1", "ddp"), ("zero2", "ddp"), ("ddp", "ddp")]
FULL_TO_2 = [("ddp", "zero2"), ("ddp", "zero3"), ("zero3", "ddp")]
STEPS = 3


def make_engine(rank, world, label, storage, lines=None):
    from gentrain import load
    from gentrain.engine import Engine

    spec = load("vae/debug", ["job.config.channels=[8,16]", "train.batch_size=16", "train.steps=50",
                              f"storage_path={storage}", "tracking.enabled=false"])
    spec = dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, **SECTIONS[label]))
    return Engine(spec, rank=rank, world_size=world, print_fn=lines.append if lines is not None else None)


def save_all(rank, world, labels, root):
    for label in labels:
        engine = make_engine(rank, world, label, f"{root}/storage")
        batches = engine.train_batches()
        for _ in range(STEPS):
            engine.optimizer_step(batches)
        engine.save(f"{root}/w{world}-{label}")


def load_all(rank, world, pairs, saved_world, root):
    out = {}
    for source, target in pairs:
        lines = []
        engine = make_engine(rank, world, target, f"{root}/storage", lines)
        engine.restore(f"{root}/w{saved_world}-{source}")
        weights = {network: {key: value.clone() for key, value in state.items()}  # ddp: views
                   for network, state in engine.strategy.export_state_dicts().items()}
        portable = engine.strategy.portable_state()
        position = engine.data_position()
        batches = engine.train_batches()
        metrics = engine.optimizer_step(batches)
        out[(source, target)] = {"weights": weights, "portable": portable, "lines": lines,
                                 "position": position, "loss": metrics["loss"]}
    return out


def load_then_save(rank, world, pairs, saved_world, labels, root):
    loaded = load_all(rank, world, pairs, saved_world, root)
    save_all(rank, world, labels, root)
    return loaded


def _pairs(request):
    full = request.config.getoption("--full-matrix")
    return TO_1 + (FULL_TO_1 if full else []), TO_2 + (FULL_TO_2 if full else [])


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, request):
    root = str(tmp_path_factory.mktemp("reshard"))
    to_1, to_2 = _pairs(request)
    run_world(save_all, 2, args=(sorted({source for source, _ in to_1}), root), timeout=600)
    loaded_on_1 = run_world(load_then_save, 1, args=(to_1, 2, sorted({s for s, _ in to_2}), root), timeout=600)[0]
    loaded_on_2 = run_world(load_all, 2, args=(to_2, 1, root), timeout=600)
    return root, {1: loaded_on_1, 2: loaded_on_2[0]}, loaded_on_2


def _saved(root, world, label):
    folder = f"{root}/w{world}-{label}"
    weights = torch.load(os.path.join(folder, "model.pt"), weights_only=True)["networks"]
    portable = torch.load(os.path.join(folder, "portable_state.pt"), weights_only=True)
    return weights, portable


def _assert_same_state(saved, restored):
    """Every parameter's optimizer state (moments, step) and the groups' rates, exactly."""
    for network, optimizer in saved["optimizers"].items():
        mine = restored["optimizers"][network]
        assert sorted(optimizer["state"]) == sorted(mine["state"]), network
        assert optimizer["state"], "the saved optimizer has state (steps were taken)"
        for name, state in optimizer["state"].items():
            assert sorted(state) == sorted(mine["state"][name]), name
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value).float(), torch.as_tensor(mine["state"][name][key]).float()), \
                    (name, key)
        for group, my_group in zip(optimizer["param_groups"], mine["param_groups"]):
            assert sorted(group["params"]) == sorted(my_group["params"])
            assert (group["lr"], group["initial_lr"]) == (my_group["lr"], my_group["initial_lr"])
        assert saved["schedulers"][network] == restored["schedulers"][network]


@pytest.mark.parametrize("saved_world, new_world, pair",
                         [(2, 1, p) for p in TO_1] + [(1, 2, p) for p in TO_2]
                         + [pytest.param(2, 1, p, marks=pytest.mark.full_matrix) for p in FULL_TO_1]
                         + [pytest.param(1, 2, p, marks=pytest.mark.full_matrix) for p in FULL_TO_2])
def test_weights_and_optimizer_state_survive_the_change_exactly(worlds, saved_world, new_world, pair):
    root, results, _ = worlds
    result = results[new_world][pair]
    weights, portable = _saved(root, saved_world, pair[0])
    for network, state in weights.items():
        for key, value in state.items():
            assert torch.equal(value, result["weights"][network][key]), (network, key)
    _assert_same_state(portable, result["portable"])
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_the_resume_names_the_change_and_continues_the_data_from_the_global_position(worlds):
    _, results, to_2 = worlds
    one = results[1][("zero3", "ddp")]
    assert one["lines"] == ["resuming 2 workers deepspeed-zero3 checkpoint on 1 worker ddp: optimizer state "
                            "re-sharded from the strategy-neutral files"]
    # 2 ranks x 3 steps of the epoch dealt to 2: global batch 6, continued by one rank.
    assert one["position"].to_dict() == {"epoch": 0, "deal_world": 2, "global_batch": 6}
    two = results[2][("ddp", "zero1")]
    assert two["lines"][0].startswith("resuming 1 worker ddp checkpoint on 2 workers deepspeed-zero1")
    assert two["position"].to_dict() == {"epoch": 0, "deal_world": 1, "global_batch": 3}
    assert to_2[1][("ddp", "zero1")]["lines"] == []  # rank 1 prints nothing
