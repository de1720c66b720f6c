"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel.

    from gentrain.metrics.kid import kernel_inception_distance
    kid = kernel_inception_distance(real_features, fake_features)   # kid.mean, kid.std

k(x, y) = (x . y / d + 1)^3. For each of `num_subsets` subsets (m samples drawn
without replacement from each set, seeded) the unbiased estimator

    MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
            - 2 sum_{i, j} k(x_i, y_j) / m^2

is computed; KID is their mean, reported with their standard deviation. Unlike FID it
is unbiased, so values from different sample counts can be compared. The defaults
(100 subsets of 1000) are torch-fidelity's. When a set has
fewer than `subset_size` samples the subsets shrink to the smaller set's size, and
the size used is returned so the report can say so.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gentrain.metrics.frechet import _as_features


class KernelDistance(NamedTuple):
    mean: float
    std: float
    subset_size: int
    num_subsets: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x . y / d + 1)^3 for every pair of rows: [n, d] x [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two equally sized samples with the cubic polynomial kernel."""
    m = x.shape[0]
    if m < 2 or y.shape[0] != m:
        raise ValueError(f"unbiased MMD^2 needs two samples of the same size >= 2, got {x.shape[0]} and {y.shape[0]}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(real_features, fake_features, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> KernelDistance:
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have dimension {real.shape[1]}, fake ones {fake.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets: {num_subsets} must be at least 1")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake samples, got {real.shape[0]} and {fake.shape[0]}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for subset in range(num_subsets):
        real_rows = rng.choice(real.shape[0], size, replace=False)
        fake_rows = rng.choice(fake.shape[0], size, replace=False)
        values[subset] = unbiased_mmd2(real[real_rows], fake[fake_rows])
    return KernelDistance(float(values.mean()), float(values.std()), size, num_subsets)
