"""checkpoint.asynchronous on a real gloo world of 2: the folders written in the background
verify, hold the same tensors as synchronous saves, and a run resumed from one ends
bit for bit where the uninterrupted run ends.

    .venv/bin/python -m pytest -q tests/distributed/test_async_checkpoint_world.py

Each rank drives gentrain's Engine (vae/debug on the built-in digits, 6 steps, a checkpoint
every 2; ddp, accelerate and fsdp) through `fit`, the loop the Ray worker runs: the writer's
manifest gather and barrier run on its own process group while training's collectives go on.
"""

from __future__ import annotations

import os

import pytest
import torch

import gentrain
from gentrain.checkpoint import MODEL_FILE, checkpoint_problem, step_dir_name
from gentrain.engine import Engine
from harness import run_world

STEPS = 6
EVERY = 2
STRATEGIES = ("ddp", "accelerate", "fsdp")


def _engine(rank: int, world: int, storage: str, name: str, strategy: str, asynchronous: bool) -> Engine:
    spec = gentrain.load("vae/debug", [f"train.steps={STEPS}", "train.schedule.warmup_steps=1", "train.batch_size=8",
                                       f"checkpoint.every={EVERY}", "eval.num_samples=4", "eval.max_batches=1",
                                       f"storage_path={storage}", f"name={name}", "tracking.enabled=false",
                                       f"strategy.name={strategy}", f"checkpoint.asynchronous={asynchronous}"])
    return Engine(spec, rank=rank, world_size=world, print_fn=None)


def _weights(folder: str) -> dict[str, torch.Tensor]:
    saved = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)
    return {f"{n}.{k}": v for n, state in saved["networks"].items() for k, v in state.items()}


def _differences(left: str, right: str) -> list[str]:
    """Keys whose tensors differ between two folders' model.pt (bit for bit)."""
    a, b = _weights(left), _weights(right)
    if a.keys() != b.keys():
        return ["(different keys)"]
    return [key for key in a if not torch.equal(a[key], b[key])]


def _world(rank: int, world: int, storage: str) -> dict:
    out = {}
    for strategy in STRATEGIES:
        root = os.path.join(storage, strategy)
        _engine(rank, world, root, "async", strategy, True).fit()
        _engine(rank, world, root, "sync", strategy, False).fit()
        resumed = _engine(rank, world, root, "resumed", strategy, True)
        resumed.restore(os.path.join(root, "async", step_dir_name(EVERY)))  # verified first
        resumed.fit()
        torch.distributed.barrier()
        if rank == 0:
            folders = {run: [os.path.join(root, run, step_dir_name(step)) for step in range(first, STEPS + 1, EVERY)]
                       for run, first in (("async", EVERY), ("sync", EVERY), ("resumed", 2 * EVERY))}
            out[strategy] = {
                "problems": {folder: checkpoint_problem(folder) for run in folders.values() for folder in run},
                "async vs sync": [_differences(a, s) for a, s in zip(folders["async"], folders["sync"])],
                "resumed vs async": _differences(folders["async"][-1], folders["resumed"][-1]),
            }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(_world, 2, args=(str(tmp_path_factory.mktemp("async-checkpoints")),), timeout=600)[0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_folder_written_in_the_background_verifies(results, strategy):
    problems = results[strategy]["problems"]
    assert len(problems) == 3 * STEPS // EVERY - 1  # the resumed run starts after the first
    assert {folder: problem for folder, problem in problems.items() if problem} == {}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_background_folders_hold_the_synchronous_tensors(results, strategy):
    assert results[strategy]["async vs sync"] == [[]] * (STEPS // EVERY)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_resume_from_a_background_folder_ends_bit_for_bit_as_the_uninterrupted_run(results, strategy):
    assert results[strategy]["resumed vs async"] == []
