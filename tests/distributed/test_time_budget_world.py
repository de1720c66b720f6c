"""train.max_time on a real process group of 2: rank 0's clock decides, every rank stops at
the same step (an all-reduced decision at each log step), and a rank whose own clock says the
budget is spent does not stop alone.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest -q tests/distributed/test_time_budget_world.py
"""

from __future__ import annotations

import gentrain
import gentrain.engine
from gentrain.checkpoint import read_meta, step_dir_name
from gentrain.engine import Engine
from harness import run_world

STEPS = 6


class _RacingClock:
    """A clock an hour further on at each reading: its owner thinks any budget is spent."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 3600.0
        return self.now

    def __getattr__(self, name):  # everything else (time.time, perf_counter for step timing) is real
        import time

        return getattr(time, name)


def _fit(rank: int, world: int, storage: str, racing_rank: int) -> dict:
    spec = gentrain.load("vae/debug", [f"train.steps={STEPS}", "train.schedule.warmup_steps=1", "train.batch_size=4",
                                       "train.log_every=2", "checkpoint.every=100", "eval.num_samples=4",
                                       "eval.max_batches=1", f"storage_path={storage}", "tracking.enabled=false",
                                       "train.max_time=10m"])
    if rank == racing_rank:
        gentrain.engine.time = _RacingClock()
    engine = Engine(spec, rank=rank, world_size=world, print_fn=None)
    engine.fit()
    folder = f"{spec.run_dir}/{step_dir_name(engine.step)}"
    meta = read_meta(folder) if rank == 0 else None
    return {"step": engine.step, "stopped": engine.stopped_at_time_budget,
            "meta_stopped": meta and meta["stopped_at_time_budget"], "meta_step": meta and meta["step"]}


def test_rank_zero_clock_decides_for_every_rank(tmp_path):
    for folder in ("zero", "one"):  # made here: two ranks validating a missing folder race to create it
        (tmp_path / folder).mkdir()
    # Rank 0's clock says the 10 minutes are spent at the first check (step 2): both stop there,
    # with the final checkpoint written as at train.steps.
    ranks = run_world(_fit, world_size=2, args=(str(tmp_path / "zero"), 0))
    assert [(r["step"], r["stopped"]) for r in ranks] == [(2, True), (2, True)]
    assert (ranks[0]["meta_stopped"], ranks[0]["meta_step"]) == (True, 2)
    # Only rank 1's clock races: rank 0's decides, so nobody stops early.
    ranks = run_world(_fit, world_size=2, args=(str(tmp_path / "one"), 1))
    assert [(r["step"], r["stopped"]) for r in ranks] == [(STEPS, False), (STEPS, False)]
    assert (ranks[0]["meta_stopped"], ranks[0]["meta_step"]) == (False, STEPS)
