"""One report dict from real and generated features: FID, KID, IS, precision/recall.

    from gentrain.metrics import compute_metrics
    report = compute_metrics(real.features, fake.features, logits=fake.logits,
                             extractor_name=extractor.name)
    # {"extractor": "inception-v3-fid-2015-12-05", "num_real": ..., "fid": ..., "kid": ..., ...}

The report is flat (names to numbers, plus the extractor's name) so that it can be
logged to MLflow as is. It always names the extractor and the sample counts, and the
settings each metric actually used (KID's default subset size is min(1000, n // 2)), so
two numbers are only ever compared when they were computed the same way.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from gentrain.metrics.frechet import feature_statistics, frechet_distance_terms
from gentrain.metrics.inception_score import inception_score_from_logits
from gentrain.metrics.kid import kernel_inception_distance
from gentrain.metrics.precision_recall import precision_recall

KNOWN_METRICS = ("fid", "kid", "is", "pr")


def compute_metrics(real_features, fake_features, logits=None, metrics: Iterable[str] = KNOWN_METRICS, *,
                    extractor_name: str, real_statistics: tuple[np.ndarray, np.ndarray] | None = None,
                    kid_subsets: int = 100, kid_subset_size: int | None = None, kid_seed: int = 0,
                    is_splits: int = 10, pr_k: int = 3) -> dict:
    """Metrics of generated samples against real ones, as {name: value} plus provenance.

    real_features / fake_features: [N, D] features from the extractor named
    `extractor_name`; `logits` are the generated samples' class logits (needed for
    "is"). `real_statistics` (mu, sigma), e.g. cached over 50k samples, replaces the
    statistics of `real_features` for FID, while KID and precision/recall use the
    (usually fewer) real features themselves. `real_features` may be None when only
    "fid" (with real_statistics) or "is" is asked for.
    """
    chosen = _check_metrics(metrics)
    if not extractor_name:
        raise ValueError("extractor_name is required: the report must say which features it was computed on")
    fake = np.asarray(fake_features)
    report: dict = {"extractor": extractor_name, "num_fake": int(fake.shape[0])}
    if real_features is not None:
        report["num_real"] = int(np.asarray(real_features).shape[0])
    if "fid" in chosen:
        report.update(_fid(real_features, fake, real_statistics))
    if "kid" in chosen:
        kid = kernel_inception_distance(_need_real(real_features, "kid"), fake, kid_subsets, kid_subset_size, kid_seed)
        report.update(kid=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size, kid_subsets=kid.num_subsets)
    if "is" in chosen:
        if logits is None:
            raise ValueError(f"metric 'is' needs class logits, and none were given; extractor {extractor_name!r} "
                             "may not provide them (leave 'is' out of metrics)")
        score = inception_score_from_logits(logits, splits=is_splits)
        report.update({"is": score.mean, "is_std": score.std, "is_splits": score.splits})
    if "pr" in chosen:
        result = precision_recall(_need_real(real_features, "pr"), fake, k=pr_k)
        report.update(precision=result.precision, recall=result.recall, pr_k=result.k)
    return report


def _fid(real_features, fake: np.ndarray, real_statistics) -> dict:
    if real_statistics is not None:
        mu_real, sigma_real = real_statistics
        source = {"fid_real_source": "statistics"}
    else:
        mu_real, sigma_real = feature_statistics(_need_real(real_features, "fid"))
        source = {}
    terms = frechet_distance_terms(mu_real, sigma_real, *feature_statistics(fake))
    result = {"fid": terms.distance, **source}
    if terms.offset:
        result["fid_offset"] = terms.offset  # the matrix square root needed eps * I: approximate
    return result


def _check_metrics(metrics: Iterable[str]) -> set[str]:
    chosen = {metrics} if isinstance(metrics, str) else set(metrics)
    unknown = sorted(chosen - set(KNOWN_METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(KNOWN_METRICS)}")
    if not chosen:
        raise ValueError(f"no metrics asked for; choose from {', '.join(KNOWN_METRICS)}")
    return chosen


def _need_real(real_features, metric: str):
    if real_features is None:
        raise ValueError(f"metric {metric!r} needs real features (real_features is None)")
    return real_features
