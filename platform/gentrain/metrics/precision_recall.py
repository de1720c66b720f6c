"""Improved precision and recall of generative models (Kynkaanniemi et al. 2019).

    from gentrain.metrics.precision_recall import precision_recall
    result = precision_recall(real_features, fake_features, k=3)   # result.precision, result.recall

Each set's manifold is the union of balls around its samples, each ball's radius
the distance to that sample's k-th nearest neighbour in the same set (itself not
counted). Precision is the fraction of generated samples inside the real manifold
(are the samples realistic?); recall the fraction of real samples inside the
generated manifold (is the data's variety covered?). A sample on a ball's boundary
counts as inside, as in the paper's code; distances are compared squared.

Distances are computed block by block (`batch_size` rows against a whole set), so
10k x 10k in 2048 dimensions needs a few hundred MB rather than the 800 MB of a full
float64 matrix, and the real-vs-fake distances are computed once for both numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gentrain.metrics.frechet import _as_features


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float
    k: int


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> PrecisionRecall:
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have dimension {real.shape[1]}, fake ones {fake.shape[1]}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k ({k}) and batch_size ({batch_size}) must be at least 1")
    for name, count in (("real", real.shape[0]), ("fake", fake.shape[0])):
        if count <= k:
            raise ValueError(f"{name} features: {count} samples, but k={k} neighbours need at least {k + 1}")
    real_radii = knn_squared_radii(real, k, batch_size)
    fake_radii = knn_squared_radii(fake, k, batch_size)
    fake_inside = np.zeros(fake.shape[0], dtype=bool)
    real_inside = np.zeros(real.shape[0], dtype=bool)
    real_norms = _squared_norms(real)
    for start in range(0, fake.shape[0], batch_size):
        block = fake[start:start + batch_size]
        distances = _squared_distances(block, real, real_norms)  # [block, real]
        fake_inside[start:start + batch_size] = (distances <= real_radii[None, :]).any(axis=1)
        real_inside |= (distances <= fake_radii[start:start + batch_size, None]).any(axis=0)
    return PrecisionRecall(float(fake_inside.mean()), float(real_inside.mean()), k)


def knn_squared_radii(features: np.ndarray, k: int, batch_size: int = 1024) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    norms = _squared_norms(features)
    radii = np.empty(features.shape[0])
    for start in range(0, features.shape[0], batch_size):
        distances = _squared_distances(features[start:start + batch_size], features, norms)
        # Position 0 of the sorted row is the sample itself (distance 0), so the k-th
        # neighbour is at position k; partition finds it without a full sort.
        radii[start:start + batch_size] = np.partition(distances, k, axis=1)[:, k]
    return radii


def _squared_norms(features: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", features, features)


def _squared_distances(rows: np.ndarray, others: np.ndarray, other_norms: np.ndarray) -> np.ndarray:
    distances = _squared_norms(rows)[:, None] + other_norms[None, :] - 2.0 * rows @ others.T
    return np.maximum(distances, 0.0)  # rounding can push a true 0 slightly negative
