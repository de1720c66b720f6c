"""FID/KID/IS/PR during training (spec eval.metrics), computed by all ranks together.

    eval: {every: 1000, metrics: [fid, kid], fid_samples: 50000, extractor: inception,
           inception_weights: ~/models/pt_inception-2015-12-05-6726825d.pth,
           is_splits: 10, kid_subsets: 100, kid_subset_size: null}   # null: min(1000, n // 2)

At each evaluation every rank draws its share of the eval.fid_samples (units r, r + W,
... of work.py, each with its own seed, the same at every evaluation so curves are not
noisy from the draw), extracts features, and summarises them. The summaries meet in
two all-reduces (sums): first count and sum (the common centre), then the sums about
that centre, the KID/PR rows each rank kept (zero elsewhere) and the IS split sums.
The reference statistics of the training split are computed the same way the first
time (then cached on rank 0's disk, logged as an artifact) and read from the cache after.
The eval.* settings are the run's MLflow params; KID's subset size, which the default
resolves from the set sizes, is logged beside kid as eval/<label>/kid_subset_size.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from gentrain.evaluation.work import data_units, generated_units, kept_rows, summarize_data, summarize_generated
from gentrain.metrics.frechet import RunningStatistics
from gentrain.metrics.reference import find_cached_reference, store_reference
from gentrain.metrics.settings import MetricSettings
from gentrain.metrics.summary import LOGGED_SETTINGS, REPORTED, FeatureSummary, summary_metrics


class PeriodicSampleMetrics:
    """Called by Worker.evaluate on every rank; returns {eval/<label>/<metric>: value} on rank 0, {} elsewhere."""

    def __init__(self, spec, index, rank: int, world_size: int, device: torch.device, all_reduce):
        from gentrain.evaluation.extractors import make_extractor

        self.spec, self.index, self.rank, self.world_size = spec, index, rank, world_size
        self.all_reduce = all_reduce
        self.extractor = make_extractor(spec.eval.extractor, spec.eval.inception_weights, device,
                                        expected_shape=tuple(index.shape))
        self.reference = None
        self.reference_ready = False  # on every rank: the reference pass is a collective, done once
        self.reference_logged = False  # rank 0 logs the reference file once per run

    def __call__(self, draw, what: str = "sample()") -> dict[str, float]:
        """`draw(n, generator)`: the job type's samples from the evaluation weights."""
        settings = self.spec.eval
        if not self.reference_ready:
            self.reference = self._reference()
            self.reference_ready = True
        total = settings.fid_samples
        units = generated_units(total, settings.sample_batch_size)[self.rank::self.world_size]
        summary = summarize_generated(draw, self.extractor, units, total, seed=self.spec.train.seed,
                                      keep=self._keep(total, shuffled=False), is_splits=settings.is_splits,
                                      what=what)
        merged = all_reduce_summary(summary, self.all_reduce, self.extractor.dim)
        if self.rank != 0:
            return {}
        report = summary_metrics(self.reference, merged, settings.metrics, extractor_name=self.extractor.name,
                                 settings=MetricSettings.of_spec(settings))
        return {f"eval/{self.extractor.label}/{key}": float(report[key]) for key in REPORTED + LOGGED_SETTINGS if key in report}

    def _keep(self, total: int, shuffled: bool) -> np.ndarray:
        wanted = {"kid", "pr"} & set(self.spec.eval.metrics)
        return kept_rows(total, shuffled) if wanted else np.arange(0)

    def _reference(self):
        """Rank 0's cached statistics, or all ranks compute them together (a collective)."""
        split = self.spec.data.train_split
        total = min(self.spec.eval.fid_samples, self.index.total(split))
        cached = None
        if self.rank == 0:
            cached = find_cached_reference(self.extractor.name, content_hash=self.index.content_hash, split=split,
                                           num_samples=total)
        flag = self.all_reduce(torch.tensor([0.0 if cached is None else 1.0], dtype=torch.float64), op="sum")
        if float(flag[0]) > 0:
            return cached
        units = data_units(self.index, split, total)[self.rank::self.world_size]
        summary = summarize_data(self.index, split, self.extractor, units, total,
                                 self.spec.eval.sample_batch_size, keep=self._keep(total, shuffled=True))
        merged = all_reduce_summary(summary, self.all_reduce, self.extractor.dim)
        if self.rank != 0:
            return None
        # Not print(): Ray Train tees it in workers (lines twice), as loop.py notes.
        sys.stdout.write(f"[gentrain] reference statistics of {split} ({total} images, {self.extractor.name}) "
                         "computed and cached\n")
        return store_reference(merged.statistics, merged.kept_features(), self.extractor.name,
                               content_hash=self.index.content_hash, split=split, num_samples=total)


def all_reduce_summary(summary: FeatureSummary, all_reduce, dim: int) -> FeatureSummary:
    """The union of every rank's summary, on every rank (two all-reduces of sums)."""
    first = torch.from_numpy(np.concatenate([[summary.count], summary.statistics.raw_sum(dim)]))
    first = all_reduce(first.to(torch.float64), op="sum").numpy()
    centre = first[1:] / max(first[0], 1.0)
    packed = all_reduce(torch.from_numpy(pack_summary(summary, centre, dim)), op="sum").numpy()
    return unpack_summary(packed, summary, centre, int(first[0]), dim)


def pack_summary(summary: FeatureSummary, centre: np.ndarray, dim: int) -> np.ndarray:
    """One float64 vector whose element-wise sum over ranks describes the union."""
    total, outer = summary.statistics.sums_around(centre)
    kept = np.zeros((summary.keep.size, dim))
    present = np.zeros(summary.keep.size)
    positions = np.searchsorted(summary.keep, list(summary.kept))
    for position, row in zip(positions, summary.kept.values()):
        kept[position], present[position] = row, 1.0
    parts = [total, outer.ravel(), kept.ravel(), present]
    if summary.is_splits:
        parts += [summary.split_counts, summary.split_probability_sums.ravel(), summary.split_negentropy_sums]
    return np.concatenate(parts)


def unpack_summary(vector: np.ndarray, like: FeatureSummary, centre: np.ndarray, count: int,
                   dim: int) -> FeatureSummary:
    merged = FeatureSummary(like.total, like.keep, like.split_probability_sums.shape[1] if like.is_splits else None,
                            like.is_splits or 10)
    sizes = [dim, dim * dim, like.keep.size * dim, like.keep.size]
    if like.is_splits:
        sizes += [like.is_splits, like.split_probability_sums.size, like.is_splits]
    pieces = np.split(vector, np.cumsum(sizes)[:-1])
    merged.statistics = RunningStatistics.from_sums(count, centre, pieces[0], pieces[1].reshape(dim, dim))
    kept = pieces[2].reshape(like.keep.size, dim)
    merged.kept = {int(row): kept[i].astype(np.float32) for i, row in enumerate(like.keep) if pieces[3][i] > 0}
    if like.is_splits:
        merged.split_counts = pieces[4]
        merged.split_probability_sums = pieces[5].reshape(like.split_probability_sums.shape)
        merged.split_negentropy_sums = pieces[6]
    return merged
