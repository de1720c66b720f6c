"""Strategies agree: same seed and data give the same fp32 losses, and resume is exact.

Each case runs on a real gloo process group of 2 CPU processes.
"""

import pytest
import torch

from common import run_losses, run_resume
from harness import run_world

STEPS = 6
STRATEGIES = {
    "ddp": {"name": "ddp"},
}


def reference(world: int = 2, **train):
    return run_world(run_losses, world, args=({"name": "ddp"}, train, STEPS))[0]


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
