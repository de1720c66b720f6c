"""Engine's per-step seeding leaves the CPU generator exactly as torch.manual_seed does (the
noise of a step, and so bit-exact resume, must not change with the cheaper call)."""

from __future__ import annotations

import torch

from gentrain.engine import seed_step


def test_seed_step_sets_the_cpu_generator_as_manual_seed_does():
    for seed in (0, 1_000_003, 2**40 + 7):
        torch.manual_seed(seed)
        expected_state, expected_draw = torch.get_rng_state(), torch.randn(5)
        torch.manual_seed(12345)  # something else in between
        torch.randn(3)
        seed_step(seed, torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), expected_state)
        assert torch.equal(torch.randn(5), expected_draw)
