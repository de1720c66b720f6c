"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over splits.

    from gentrain.metrics.inception_score import inception_score_from_logits
    score = inception_score_from_logits(logits, splits=10)   # score.mean, score.std

The samples are cut into `splits` consecutive chunks (the original code's way, so
shuffle beforehand if their order means something); in each chunk p(y) is the mean of
the chunk's p(y|x), and the chunk's score is exp of the mean KL divergence. The
result is the mean and standard deviation of the chunks' scores. It ranges from 1
(every sample gets the same prediction) to the number of classes (confident
predictions spread evenly over all classes).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class InceptionScore(NamedTuple):
    mean: float
    std: float
    splits: int


def inception_score_from_logits(logits, splits: int = 10) -> InceptionScore:
    """IS from [N, C] unnormalised class scores (a softmax is applied, in float64)."""
    scores = _as_matrix(logits, "logits")
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return _score(log_probabilities, splits)


def inception_score(probabilities, splits: int = 10) -> InceptionScore:
    """IS from [N, C] class probabilities (rows summing to 1)."""
    probabilities = _as_matrix(probabilities, "probabilities")
    if (probabilities < 0).any() or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probabilities must be non-negative with rows summing to 1; "
                         "for raw network outputs use inception_score_from_logits")
    with np.errstate(divide="ignore"):
        return _score(np.log(probabilities), splits)


def _score(log_probabilities: np.ndarray, splits: int) -> InceptionScore:
    count = log_probabilities.shape[0]
    if not 1 <= splits <= count:
        raise ValueError(f"splits: {splits} must be between 1 and the number of samples ({count})")
    # Chunk i is rows [i N // splits, (i + 1) N // splits), the original code's boundaries.
    bounds = [index * count // splits for index in range(splits + 1)]
    scores = [np.exp(_mean_kl(log_probabilities[start:end])) for start, end in zip(bounds, bounds[1:])]
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), splits)


def _mean_kl(log_probabilities: np.ndarray) -> float:
    """Mean over rows of KL(p(y|x) || p(y)), with p(y) the rows' mean; 0 log 0 counts as 0."""
    probabilities = np.exp(log_probabilities)
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0, then 0 * inf, where a class never occurs
        log_marginal = np.log(probabilities.mean(axis=0))
        terms = probabilities * (log_probabilities - log_marginal)
    return float(np.where(probabilities > 0, terms, 0.0).sum(axis=1).mean())


def _as_matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, num_classes], got shape {array.shape}")
    if np.isnan(array).any() or np.isposinf(array).any():
        raise ValueError(f"{name} contains NaN or +inf values")
    return array
