"""The shared loop pieces under DDP: world size, resume, a GAN-shaped pair and gradient
checkpointing (under DDP and ZeRO-3) give the numbers they should.

    .venv/bin/python -m pytest -q tests/distributed/test_equivalence.py

Spawning a world is the slow part, so two worlds carry every case: a world of 2 runs
them all in turn, a world of 1 with the whole batch is the batch-2B reference.
Accelerate's equivalence with DDP is in test_accelerate.py, DeepSpeed's in
test_deepspeed.py.
"""

import pytest
import torch

from common import close, run_gan, run_losses, run_resume
from harness import run_world

STEPS = 6
RESUME_AT = 3
GAN_STEPS = 8
BATCH_CASES = {"plain": {}, "accum2": {"grad_accum": 2}}
CLIP = {"grad_clip": 0.5}
CHECKPOINTED = {"ddp": {"name": "ddp"}, "zero3": {"name": "deepspeed", "zero_stage": 3}}


def _two_workers(rank: int, world: int, directory: str) -> dict:
    out = {label: run_losses(rank, world, {"name": "ddp"}, train, STEPS) for label, train in BATCH_CASES.items()}
    out["clip"] = run_losses(rank, world, {"name": "ddp"}, CLIP, STEPS)
    for label, section in CHECKPOINTED.items():
        out["checkpointed", label] = run_losses(rank, world, {**section, "grad_checkpointing": True}, CLIP, STEPS)
    out["resume"] = run_resume(rank, world, {"name": "ddp"}, RESUME_AT, directory)
    out["gan"] = run_gan(rank, world, {"name": "ddp"}, GAN_STEPS)
    return out


def _one_worker(rank: int, world: int) -> dict:
    return {label: run_losses(rank, world, {"name": "ddp"}, train, STEPS) for label, train in BATCH_CASES.items()}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):  # [rank 0's results, rank 1's]
    return run_world(_two_workers, 2, args=(str(tmp_path_factory.mktemp("ddp-resume")),))


@pytest.fixture(scope="module")
def one_worker():
    return run_world(_one_worker, 1)[0]


@pytest.mark.parametrize("label", sorted(BATCH_CASES))
def test_two_workers_batch_b_match_one_worker_batch_2b(two_workers, one_worker, label):
    one_losses, one_params = one_worker[label]
    two_losses, two_params = two_workers[0][label]
    close(two_losses, one_losses, rtol=1e-5)
    close(two_params, one_params, rtol=1e-5, atol=1e-6)
    assert len(set(one_losses)) == STEPS  # the weights move: each step sees a new loss


def test_replicas_stay_identical(two_workers):
    for label in (*BATCH_CASES, "clip"):
        close(two_workers[1][label][1], two_workers[0][label][1], rtol=0, atol=0)


def test_resume_is_exact(two_workers):
    assert max(rank_result["resume"] for rank_result in two_workers) <= 1e-6


def test_gan_shaped_pair_trains(two_workers):
    d_losses, g_losses, moved = two_workers[0]["gan"]
    assert moved == {"generator": True, "discriminator": True}
    assert all(map(torch.isfinite, torch.tensor(d_losses + g_losses)))
    assert d_losses[-1] != d_losses[0] and g_losses[-1] != g_losses[0]


@pytest.mark.parametrize("label", sorted(CHECKPOINTED))
def test_grad_checkpointing_changes_no_number(two_workers, label):
    expected_losses, expected_params = two_workers[0]["clip"]
    losses, params = two_workers[0]["checkpointed", label]
    close(losses, expected_losses, rtol=1e-5)
    close(params, expected_params, rtol=1e-5, atol=1e-6)
