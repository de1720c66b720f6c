"""Strategies agree: same seed and data give the same fp32 losses, and resume is exact.

Each case runs on a real gloo process group of 2 CPU processes.
"""

import functools

import pytest
import torch

from common import run_losses, run_resume
from harness import run_world

STEPS = 6
STRATEGIES = {
    "ddp": {"name": "ddp"},
    "accelerate": {"name": "accelerate"},
}


@functools.lru_cache(maxsize=None)
def _reference(world: int, train_items: tuple):
    return run_world(run_losses, world, args=({"name": "ddp"}, dict(train_items), STEPS))[0]


def reference(world: int = 2, **train):
    """DDP's losses and final weights (computed once per setting)."""
    return _reference(world, tuple(sorted(train.items())))


@pytest.mark.parametrize("train", [{"grad_clip": 0.5}, {"grad_accum": 2}], ids=["clip", "accum2"])
@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"ddp"}))
def test_fp32_losses_and_weights_match_ddp(name, train):
    expected_losses, expected_params = reference(**train)
    losses, params = run_world(run_losses, 2, args=(STRATEGIES[name], train, STEPS))[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(params, expected_params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [{}, {"grad_accum": 2}], ids=["plain", "accum2"])
def test_two_workers_batch_b_match_one_worker_batch_2b(train):
    one_losses, one_params = reference(world=1, **train)
    two_losses, two_params = reference(world=2, **train)
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(two_params, one_params, rtol=1e-5, atol=1e-6)
    assert len(set(one_losses)) == STEPS  # the weights move: each step sees a new loss


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_is_exact(name, tmp_path):
    differences = run_world(run_resume, 2, args=(STRATEGIES[name], 3, str(tmp_path)))
    assert max(differences) <= 1e-6, differences


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_gan_shaped_pair_trains(name):
    from common import run_gan

    d_losses, g_losses, moved = run_world(run_gan, 2, args=(STRATEGIES[name], 8))[0]
    assert moved == {"generator": True, "discriminator": True}
    assert all(map(torch.isfinite, torch.tensor(d_losses + g_losses)))
    assert d_losses[-1] != d_losses[0] and g_losses[-1] != g_losses[0]


@pytest.mark.parametrize("section", [{"name": "ddp"}, {"name": "deepspeed", "zero_stage": 3}],
                         ids=["ddp", "zero3"])
def test_grad_checkpointing_changes_no_number(section):
    expected_losses, expected_params = reference(grad_clip=0.5)
    losses, params = run_world(run_losses, 2, args=({**section, "grad_checkpointing": True},
                                                    {"grad_clip": 0.5}, STEPS))[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(params, expected_params, rtol=1e-5, atol=1e-6)
