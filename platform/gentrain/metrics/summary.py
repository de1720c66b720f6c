"""What the metrics need of a feature stream, in a form that adds up across workers.

    from gentrain.metrics.summary import FeatureSummary, summary_metrics
    summary = FeatureSummary(total=50_000, keep=range(10_000), logits_dim=1008)
    summary.add(features, logits, start=0)        # rows 0.. of the stream; any order of chunks
    summary.merge(other_workers_summary)           # the union, as if one process had seen it all
    report = summary_metrics(reference, summary, ["fid", "kid", "is"], extractor_name=...)

    # Features already in memory (tests, notebooks): the same report through the same code.
    report = compute_metrics(real_features, fake_features, logits=fake_logits, extractor_name=...)

50k generated samples are split over many workers; holding all their 2048-d features
in one place is neither needed nor cheap. Each metric needs only a sum:

- FID: count, sum and sum of outer products (RunningStatistics; merged exactly about
  a common centre).
- KID and precision/recall: the features of a fixed set of global row indices
  (`keep`), whichever worker computed them.
- Inception Score: per split (rows [i N / S, (i + 1) N / S) of the N in the stream, the
  original code's boundaries), the count, the sum of p(y|x) and the sum of
  sum_y p log p. The split's mean KL is then mean(sum p log p) - sum_y pbar log pbar,
  which equals the mean of KL(p(y|x) || pbar) exactly.

Because every row carries its global index, the result does not depend on how rows
were dealt to workers: the distributed numbers equal the single-process ones up to
float rounding in the order of additions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from gentrain.metrics.frechet import RunningStatistics, feature_statistics, frechet_distance_terms
from gentrain.metrics.inception_score import InceptionScore
from gentrain.metrics.kid import kernel_inception_distance
from gentrain.metrics.precision_recall import precision_recall
from gentrain.metrics.settings import MetricSettings

SAMPLE_METRICS = ("fid", "kid", "is", "pr")
# What summary_metrics reports for them: printed, and logged to MLflow.
REPORTED = ("fid", "kid", "kid_std", "is", "is_std", "precision", "recall")
# Settings logged beside them: KID's default subset size depends on the set sizes.
LOGGED_SETTINGS = ("kid_subset_size",)


class FeatureSummary:
    """Mergeable statistics of a stream of `total` feature rows (see the module docstring)."""

    def __init__(self, total: int, keep: Iterable[int] = (), logits_dim: int | None = None, is_splits: int = 10):
        if total < 1:
            raise ValueError(f"a feature summary needs total >= 1 rows, got {total}")
        self.total = int(total)
        self.keep = np.unique(np.asarray(list(keep), dtype=np.int64))
        self.statistics = RunningStatistics()
        self.kept: dict[int, np.ndarray] = {}
        if logits_dim and not 1 <= is_splits <= self.total:
            raise ValueError(f"is_splits: {is_splits} must be between 1 and the number of samples ({self.total}) "
                             "(eval.is_splits in a spec, --is-splits on gentrain eval)")
        self.is_splits = is_splits if logits_dim else 0
        if self.is_splits:
            self.split_counts = np.zeros(self.is_splits)
            self.split_probability_sums = np.zeros((self.is_splits, logits_dim))
            self.split_negentropy_sums = np.zeros(self.is_splits)
            self.bounds = np.array([i * self.total // self.is_splits for i in range(self.is_splits + 1)])

    @property
    def count(self) -> int:
        return self.statistics.count

    def add(self, features, logits=None, start: int = 0) -> None:
        """Rows start .. start + len(features) of the stream."""
        features = np.asarray(features, dtype=np.float32)
        rows = np.arange(start, start + features.shape[0])
        if rows.size and (rows[0] < 0 or rows[-1] >= self.total):
            raise ValueError(f"rows {rows[0]}..{rows[-1]} fall outside the stream's {self.total}")
        self.statistics.update(features)
        wanted = np.searchsorted(self.keep, rows)
        for position, row in enumerate(rows):
            if wanted[position] < self.keep.size and self.keep[wanted[position]] == row:
                self.kept[int(row)] = features[position].copy()
        if self.is_splits and logits is not None:
            self._add_logits(np.asarray(logits, dtype=np.float64), rows)

    def _add_logits(self, logits: np.ndarray, rows: np.ndarray) -> None:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        probabilities = np.exp(log_probabilities)
        negentropy = np.where(probabilities > 0, probabilities * log_probabilities, 0.0).sum(axis=1)
        splits = np.searchsorted(self.bounds, rows, side="right") - 1
        np.add.at(self.split_counts, splits, 1.0)
        np.add.at(self.split_probability_sums, splits, probabilities)
        np.add.at(self.split_negentropy_sums, splits, negentropy)

    def merge(self, other: "FeatureSummary") -> "FeatureSummary":
        if other.total != self.total or not np.array_equal(other.keep, self.keep) or other.is_splits != self.is_splits:
            raise ValueError("cannot merge summaries of different streams (total, kept rows or IS splits differ)")
        self.statistics.merge(other.statistics)
        self.kept.update(other.kept)
        if self.is_splits:
            # New arrays, not +=: a summary returned by Ray holds read-only (zero-copy) arrays.
            self.split_counts = self.split_counts + other.split_counts
            self.split_probability_sums = self.split_probability_sums + other.split_probability_sums
            self.split_negentropy_sums = self.split_negentropy_sums + other.split_negentropy_sums
        return self

    def kept_features(self) -> np.ndarray:
        """The kept rows in index order (those the stream reached)."""
        return np.stack([self.kept[row] for row in sorted(self.kept)]) if self.kept else np.empty((0, 0), np.float32)

    def inception_score(self) -> InceptionScore:
        if not self.is_splits:
            raise ValueError("no class logits were summarised (the extractor gives none)")
        if (self.split_counts == 0).any():
            raise ValueError(f"Inception Score: only {self.count} of {self.total} rows arrived; a split is empty")
        marginals = self.split_probability_sums / self.split_counts[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            marginal_terms = np.where(marginals > 0, marginals * np.log(marginals), 0.0).sum(axis=1)
        mean_kl = self.split_negentropy_sums / self.split_counts - marginal_terms
        scores = np.exp(mean_kl)
        return InceptionScore(float(scores.mean()), float(scores.std()), self.is_splits)


def summary_metrics(reference, fake: FeatureSummary, metrics: Iterable[str], *, extractor_name: str,
                    settings: MetricSettings = MetricSettings()) -> dict:
    """The metrics of generated samples, from a reference (mu, sigma, features, count,
    extractor: a ReferenceStatistics) and the merged summary of the samples' features.

    The report is flat (names to numbers, plus the extractor's name and the set sizes) so
    that it can be logged to MLflow as is; `settings` holds what each computed metric used
    (KID's subset size resolved for these set sizes), so a report says how it was computed.
    """
    chosen = _chosen(metrics)
    if not extractor_name:
        raise ValueError("extractor_name is required: the report must say which features it was computed on")
    if reference.extractor != extractor_name:
        raise ValueError(f"reference statistics were computed with {reference.extractor!r}, the samples with "
                         f"{extractor_name!r}: numbers from different extractors are never compared")
    report: dict = {"extractor": extractor_name, "num_fake": fake.count, "num_real": reference.count}
    used: dict = {}
    if "fid" in chosen:
        terms = frechet_distance_terms(reference.mu, reference.sigma, *fake.statistics.statistics())
        report["fid"] = terms.distance
        if terms.offset:
            report["fid_offset"] = terms.offset  # the matrix square root needed eps * I: approximate
    kept = fake.kept_features() if {"kid", "pr"} & set(chosen) else None
    if "kid" in chosen:
        kid = kernel_inception_distance(_real_features(reference, "kid"), kept, settings.kid_subsets,
                                        settings.kid_subset_size, settings.kid_seed)
        report.update(kid=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size, kid_subsets=kid.num_subsets)
        used.update(kid_subsets=kid.num_subsets, kid_subset_size=kid.subset_size,
                    kid_subset_size_rule="set" if settings.kid_subset_size else "default: min(1000, n // 2)",
                    kid_num_real=int(reference.features.shape[0]), kid_num_fake=int(kept.shape[0]))
    if "is" in chosen:
        score = fake.inception_score()
        report.update({"is": score.mean, "is_std": score.std, "is_splits": score.splits})
        used.update(is_splits=score.splits)
    if "pr" in chosen:
        result = precision_recall(_real_features(reference, "pr"), kept, k=settings.pr_k)
        report.update(precision=result.precision, recall=result.recall, pr_k=result.k,
                      pr_num_real=int(reference.features.shape[0]), pr_num_fake=int(kept.shape[0]))
        used.update(pr_k=result.k)
    report["settings"] = used
    return report


@dataclass(frozen=True)
class _InMemoryReference:
    """The real side of compute_metrics: what summary_metrics reads of a ReferenceStatistics."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    count: int | None
    extractor: str


def compute_metrics(real_features, fake_features, logits=None, metrics: Iterable[str] = SAMPLE_METRICS, *,
                    extractor_name: str, real_statistics: tuple[np.ndarray, np.ndarray] | None = None,
                    kid_subsets: int = 100, kid_subset_size: int | None = None, kid_seed: int = 0,
                    is_splits: int = 10, pr_k: int = 3) -> dict:
    """summary_metrics of features held in memory: [N, D] arrays from the extractor named
    `extractor_name`; `logits` are the generated samples' class logits (needed for "is").
    `real_statistics` (mu, sigma), e.g. cached over 50k samples, replaces the statistics of
    `real_features` for FID, while KID and precision/recall use the (usually fewer) real
    features themselves. `real_features` may be None when only "fid" (with
    real_statistics) or "is" is asked for.
    """
    chosen = _chosen(metrics)
    if "is" in chosen and logits is None:
        raise ValueError(f"metric 'is' needs class logits, and none were given; extractor {extractor_name!r} "
                         "may not provide them (leave 'is' out of metrics)")
    fake = np.asarray(fake_features)
    logits = None if logits is None or "is" not in chosen else np.asarray(logits)
    summary = FeatureSummary(fake.shape[0], keep=range(fake.shape[0]) if {"kid", "pr"} & set(chosen) else (),
                             logits_dim=None if logits is None else logits.shape[1], is_splits=is_splits)
    summary.add(fake, logits)
    real = None if real_features is None else np.asarray(real_features)
    if real_statistics is None and real is not None:
        real_statistics = feature_statistics(real)
    if real_statistics is None:
        if "fid" in chosen:
            raise ValueError("metric 'fid' needs real features or real_statistics (both are None)")
        real_statistics = (np.zeros(fake.shape[1]), np.eye(fake.shape[1]))  # unread: no FID asked for
    reference = _InMemoryReference(*real_statistics, real, None if real is None else real.shape[0], extractor_name)
    settings = MetricSettings(is_splits=is_splits, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                              kid_seed=kid_seed, pr_k=pr_k)
    return summary_metrics(reference, summary, chosen, extractor_name=extractor_name, settings=settings)


def _chosen(metrics: Iterable[str]) -> list[str]:
    chosen = [metrics] if isinstance(metrics, str) else list(dict.fromkeys(metrics))
    unknown = [name for name in chosen if name not in SAMPLE_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(SAMPLE_METRICS)}")
    if not chosen:
        raise ValueError(f"no metrics asked for; choose from {', '.join(SAMPLE_METRICS)}")
    return chosen


def _real_features(reference, metric: str) -> np.ndarray:
    if reference.features is None:
        raise ValueError(f"metric {metric!r} needs real features (real_features is None)")
    return reference.features
