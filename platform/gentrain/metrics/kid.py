"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel.

    from gentrain.metrics.kid import kernel_inception_distance
    kid = kernel_inception_distance(real_features, fake_features)   # kid.mean, kid.std

k(x, y) = (x . y / d + 1)^3. For each of `num_subsets` subsets (m samples drawn
without replacement from each set, seeded) the unbiased estimator

    MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
            - 2 sum_{i, j} k(x_i, y_j) / m^2

is computed; KID is their mean, reported with their standard deviation. Unlike FID it
is unbiased, so values from different sample counts can be compared.

The subsets must be smaller than the sets they are drawn from: a subset of all n
samples is a permutation of them, MMD^2 ignores order, so every subset gives the same
value and the standard deviation is float noise (~1e-13). The default subset size is
therefore min(1000, n // 2) for n the smaller set (torch-fidelity's 1000 once n >= 2000),
with 100 subsets; a size >= n is refused. The size used is returned for the report.
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


DEFAULT_SUBSET_SIZE = 1000
FIELD_NAMES = {"kid_subsets": "kid_subsets", "kid_subset_size": "kid_subset_size"}
WHERE = "(eval.kid_subsets / eval.kid_subset_size in a spec, --kid-subsets / --kid-subset-size on gentrain eval)"


def check_kid_settings(num_subsets: int, subset_size: int | None, num_real: int, num_fake: int,
                       names: dict[str, str] = FIELD_NAMES) -> int:
    """The subset size to use for these set sizes; a ValueError naming the setting when there is none."""
    if num_subsets < 2:
        raise ValueError(f"{names['kid_subsets']}: {num_subsets} must be at least 2: kid_std is the spread of "
                         "KID over the subsets")
    smaller = min(num_real, num_fake)
    if subset_size is None:
        if smaller < 4:
            raise ValueError(f"KID needs at least 4 real and 4 fake samples (subsets of n // 2 >= 2), got "
                             f"{num_real} and {num_fake}")
        return min(DEFAULT_SUBSET_SIZE, smaller // 2)
    if not 2 <= subset_size < smaller:
        raise ValueError(
            f"{names['kid_subset_size']}: {subset_size} must be at least 2 and below the smaller set's {smaller} "
            f"samples ({num_real} real, {num_fake} fake): subsets of all the samples are the same set, so kid_std "
            f"would mean nothing; leave it unset for min({DEFAULT_SUBSET_SIZE}, n // 2) = "
            f"{min(DEFAULT_SUBSET_SIZE, smaller // 2)}" + (f" {WHERE}" if names is FIELD_NAMES else ""))
    return subset_size


def kernel_inception_distance(real_features, fake_features, num_subsets: int = 100,
                              subset_size: int | None = None, seed: int = 0) -> KernelDistance:
    """KID over `num_subsets` seeded subsets of `subset_size` rows (None: min(1000, smaller set // 2))."""
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have dimension {real.shape[1]}, fake ones {fake.shape[1]}")
    size = check_kid_settings(num_subsets, subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for subset in range(num_subsets):
        real_rows = rng.choice(real.shape[0], size, replace=False)
        fake_rows = rng.choice(fake.shape[0], size, replace=False)
        values[subset] = unbiased_mmd2(real[real_rows], fake[fake_rows])
    return KernelDistance(float(values.mean()), float(values.std()), size, num_subsets)
