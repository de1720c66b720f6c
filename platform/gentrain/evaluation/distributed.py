"""Sampling and feature extraction for `gentrain eval`, in this process or split over Ray workers.

    gentrain eval runs/gan-debug --metrics fid,kid --workers 4     # 4 Ray tasks on the embedded local Ray

With `workers > 1` the units (work.py) are dealt round-robin to that many Ray tasks on
`ray.init(address="local")` (or the cluster in $RAY_ADDRESS, whose workers must see the
same paths). Each task loads the checkpoint and the extractor itself, draws and
extracts its units with their own seeds, and returns a FeatureSummary; the driver
merges them. Work descriptions are plain dataclasses, so nothing unpicklable crosses
the process boundary.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from gentrain.evaluation.extractors import make_extractor
from gentrain.evaluation.work import Unit, summarize_data, summarize_generated
from gentrain.metrics.summary import FeatureSummary


@dataclass(frozen=True)
class ExtractorChoice:
    choice: str  # inception | classifier:REF
    inception_weights: str | None
    expected_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class GeneratedWork:
    checkpoint: str
    use_ema: bool
    seed: int
    total: int
    is_splits: int = 10  # fixed before sampling: each worker sums its rows into these splits


@dataclass(frozen=True)
class DataWork:
    source: str
    split: str
    total: int
    batch_size: int
    allow_pipe: bool = False


def summarize(work, extractor_choice: ExtractorChoice, units: list[Unit], workers: int = 1,
              local=None) -> FeatureSummary:
    """One merged summary of all `units`; `local` = (trained, extractor) already loaded in this process."""
    started = time.monotonic()
    if workers <= 1:
        summary = do_units(work, extractor_choice, units, local)
    else:
        summary = _on_ray(work, extractor_choice, units, workers)
    what = "samples" if isinstance(work, GeneratedWork) else f"{work.split} images"
    print(f"[gentrain] features of {summary.count} {what} in {time.monotonic() - started:.1f}s "
          f"({max(workers, 1)} worker{'s' if workers > 1 else ''})", file=sys.stderr, flush=True)
    return summary


def do_units(work, extractor_choice: ExtractorChoice, units: list[Unit], local=None) -> FeatureSummary:
    trained, extractor = local if local is not None else (None, None)
    if extractor is None:
        extractor = make_extractor(extractor_choice.choice, extractor_choice.inception_weights,
                                   expected_shape=extractor_choice.expected_shape)
    if isinstance(work, GeneratedWork):
        if trained is None:
            from gentrain.inference import load_trained

            trained = load_trained(work.checkpoint, use_ema=work.use_ema)
        return summarize_generated(trained.draw, extractor, units, work.total, work.seed,
                                   is_splits=work.is_splits, what=f"job type {trained.job.name!r} sample()")
    from gentrain.data.index import load_index

    index = load_index(work.source, allow_pipe=work.allow_pipe)
    return summarize_data(index, work.split, extractor, units, work.total, work.batch_size)


def _on_ray(work, extractor_choice: ExtractorChoice, units: list[Unit], workers: int) -> FeatureSummary:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, **({"num_cpus": max(workers, os.cpu_count() or 1)} if address == "local" else {}),
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    task = ray.remote(num_cpus=1)(_task)
    shares = [units[worker::workers] for worker in range(workers)]
    futures = [task.remote(work, extractor_choice, share) for share in shares if share]
    merged = None
    for summary in ray.get(futures):
        merged = summary if merged is None else merged.merge(summary)
    return merged


def _task(work, extractor_choice: ExtractorChoice, units: list[Unit]) -> FeatureSummary:
    torch.set_num_threads(1)  # one CPU per task: more threads only contend
    return do_units(work, extractor_choice, units)
