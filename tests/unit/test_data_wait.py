"""train/data_wait_fraction: the share of each progress window's step time spent waiting
for batches (Engine.optimizer_step times the draw and the whole step; Engine.fit adds
both to the window; the ranks' mean is logged with the other train/* metrics)."""

from __future__ import annotations

import time

import pytest

import gentrain
from gentrain.engine import Engine
from gentrain.progress import Window


class RecordingLogger:
    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, folder=None):
        pass

    def set_tag(self, key, value):
        pass


@pytest.fixture
def spec(tmp_path):
    return gentrain.load("vae/debug", ["train.steps=4", "train.schedule.warmup_steps=1", "train.log_every=2", "checkpoint.every=4", "eval.every=0",
                                       "eval.num_samples=4", "eval.max_batches=1", "job.config.iwae_samples=2", "job.config.iwae_chunk=2",
                                       f"storage_path={tmp_path}", "tracking.enabled=false"])


def test_the_fraction_is_the_windows_wait_over_its_step_time(spec):
    engine = Engine(spec, print_fn=None)
    window = Window()
    window.add({"loss": 1.0}, 0.5, 2.0)
    window.add({"loss": 3.0}, 0.25, 1.0)
    metrics = engine.train_metrics(window)
    assert metrics["train/data_wait_fraction"] == pytest.approx(0.75 / 3.0)
    assert metrics["train/loss"] == pytest.approx(2.0)
    untimed = Window()  # a window built without timings (tests feeding their own steps) has none
    untimed.add({"loss": 1.0})
    assert "train/data_wait_fraction" not in engine.train_metrics(untimed)


def test_fit_logs_it_at_every_progress_step(spec):
    logger = RecordingLogger()
    engine = Engine(spec, logger=logger, print_fn=None)
    engine.fit()
    logged = [(step, m["train/data_wait_fraction"]) for m, step in logger.metrics if "train/data_wait_fraction" in m]
    assert [step for step, _ in logged] == [2, 4]
    assert all(0.0 <= fraction < 1.0 for _, fraction in logged)


def test_a_slow_stream_shows_as_waiting(spec):
    engine = Engine(spec, print_fn=None)
    batches = engine.train_batches()

    def slow():
        for batch in batches:
            time.sleep(0.3)  # far longer than a step of the 8x8 VAE
            yield batch

    stream = slow()
    engine.optimizer_step(stream)
    waited, took = engine.step_timing
    # The sleep is inside the wait, and the step's own compute comes on top of it.
    assert waited >= 0.3 and took > waited
