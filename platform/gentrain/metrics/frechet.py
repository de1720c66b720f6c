"""Frechet distance between Gaussians fitted to features: FID when the features are Inception's.

    from gentrain.metrics.frechet import fid_from_features
    fid = fid_from_features(real_features, fake_features)   # [N, D] arrays

d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), all in float64.

The matrix square root is never taken of S1 S2 itself (not symmetric, so a general
`sqrtm` is needed, which can return complex parts or fail on singular matrices).
Only its trace is needed: with R1 = S1^(1/2) and R2 = S2^(1/2) (from `eigh` of the
symmetric matrices), (R1 R2)^T (R1 R2) = R2 S1 R2 has the eigenvalues of S1 S2, so
tr (S1 S2)^(1/2) is the sum of the singular values of R1 R2. Taking singular values
instead of square roots of eigenvalues matters for singular covariances (fewer
samples than dimensions): rounding leaves eigenvalues of size ~1e-16 in the null
space, whose square roots (~1e-8 each, over hundreds of directions) would visibly
bias the distance; singular values carry that rounding at ~1e-16. For the same
reason eigenvalues of S1, S2 below D * machine-eps * (largest) count as 0 (numpy's
`matrix_rank` rule). This is exact for singular covariances, so no offset is needed
there. Only if a decomposition fails to converge is eps * I added to both
covariances and the distance recomputed; that is reported (`FrechetTerms.offset`, a
warning) so a number computed that way is never mistaken for a clean one.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

# Eigenvalues of an input covariance below -NEGATIVE_TOLERANCE * (largest eigenvalue)
# are more than rounding: the matrix is not a covariance and the distance would be
# meaningless, so that is an error rather than something to clamp away.
NEGATIVE_TOLERANCE = 1e-5


class FrechetTerms(NamedTuple):
    distance: float
    mean_term: float  # |mu1 - mu2|^2
    trace_term: float  # tr(S1 + S2 - 2 (S1 S2)^(1/2))
    offset: float  # eps added to both diagonals; 0.0 unless an eigendecomposition failed


class RunningStatistics:
    """Mean and covariance of features seen batch by batch (50k x 2048 never held at once).

    Sums are taken around the first batch's mean (a shifted-data algorithm) so that
    the final E[xx^T] - mu mu^T does not cancel catastrophically.
    """

    def __init__(self):
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> None:
        batch = _as_features(features, "features")
        if self._shift is None:
            self._shift = batch.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((batch.shape[1], batch.shape[1]))
        if batch.shape[1] != self._shift.shape[0]:
            raise ValueError(f"features have dimension {batch.shape[1]}, earlier batches had {self._shift.shape[0]}")
        centred = batch - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += batch.shape[0]

    def sums_around(self, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sum of x - centre, sum of (x - centre)(x - centre)^T): the same sums about another point.

        Exact algebra from the sums about the own shift: with d = shift - centre,
        sum (x - c) = S + n d and sum (x - c)(x - c)^T = O + d S^T + S d^T + n d d^T.
        Workers bring their sums to one common centre before adding them up.
        """
        centre = np.asarray(centre, dtype=np.float64)
        if self._shift is None:
            return np.zeros_like(centre), np.zeros((centre.shape[0], centre.shape[0]))
        offset = self._shift - centre
        total = self._sum + self.count * offset
        outer = self._outer + np.outer(offset, self._sum) + np.outer(self._sum, offset)
        outer += self.count * np.outer(offset, offset)
        return total, outer

    def raw_sum(self, dim: int) -> np.ndarray:
        """Sum of the features themselves (zeros of `dim` before any update)."""
        if self._shift is None:
            return np.zeros(dim)
        return self._sum + self.count * self._shift

    @classmethod
    def from_sums(cls, count: int, centre: np.ndarray, total: np.ndarray, outer: np.ndarray) -> "RunningStatistics":
        """Statistics from sums about `centre` (as sums_around returns them, possibly added over workers)."""
        statistics = cls()
        if count:
            statistics.count = int(count)
            statistics._shift = np.asarray(centre, dtype=np.float64).copy()
            statistics._sum = np.asarray(total, dtype=np.float64).copy()
            statistics._outer = np.asarray(outer, dtype=np.float64).copy()
        return statistics

    def merge(self, other: "RunningStatistics") -> None:
        """Add another stream's statistics (mean and covariance of the union, as if seen here)."""
        if other.count == 0:
            return
        if self._shift is None:
            self.count, self._shift = other.count, other._shift.copy()
            self._sum, self._outer = other._sum.copy(), other._outer.copy()
            return
        if other._shift.shape != self._shift.shape:
            raise ValueError(f"cannot merge {other._shift.shape[0]}-d statistics into {self._shift.shape[0]}-d ones")
        total, outer = other.sums_around(self._shift)
        # New arrays, not +=: a summary returned by Ray holds read-only (zero-copy) arrays.
        self._sum = self._sum + total
        self._outer = self._outer + outer
        self.count += other.count

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mean_shifted = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_shifted, mean_shifted)) / (self.count - 1)
        return self._shift + mean_shifted, (sigma + sigma.T) / 2


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64; sigma is the unbiased sample covariance, as in pytorch-fid."""
    array = _as_features(features, "features")
    if array.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {array.shape[0]}")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def fid_from_features(real_features, fake_features) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets."""
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    return frechet_distance_terms(mu1, sigma1, mu2, sigma2, eps).distance


def frechet_distance_terms(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> FrechetTerms:
    """The distance split into its mean and covariance terms, and the offset if one was needed."""
    mu1, mu2 = _as_vector(mu1, "mu1"), _as_vector(mu2, "mu2")
    sigma1, sigma2 = _as_covariance(sigma1, "sigma1"), _as_covariance(sigma2, "sigma2")
    if not (mu1.shape == mu2.shape and sigma1.shape == sigma2.shape and sigma1.shape[0] == mu1.shape[0]):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    offset = 0.0
    try:
        trace_sqrt = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError as error:
        offset = eps
        warnings.warn(f"Frechet distance: eigendecomposition failed ({error}); adding {eps:g} * I to both "
                      "covariances. The result is approximate and reported with its offset.", RuntimeWarning,
                      stacklevel=2)
        identity = np.eye(sigma1.shape[0])
        sigma1, sigma2 = sigma1 + eps * identity, sigma2 + eps * identity
        trace_sqrt = trace_sqrt_product(sigma1, sigma2)
    difference = mu1 - mu2
    mean_term = float(difference @ difference)
    trace_term = float(np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return FrechetTerms(mean_term + trace_term, mean_term, trace_term, offset)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the sum of the singular values of S1^(1/2) S2^(1/2)."""
    product = _psd_sqrt(sigma1, "sigma1") @ _psd_sqrt(sigma2, "sigma2")
    return float(np.linalg.svd(product, compute_uv=False).sum())


def _psd_sqrt(matrix: np.ndarray, name: str) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    _check_psd(eigenvalues, name)
    rank_tolerance = eigenvalues.max(initial=0.0) * matrix.shape[0] * np.finfo(np.float64).eps
    roots = np.sqrt(np.where(eigenvalues > rank_tolerance, eigenvalues, 0.0))
    return (eigenvectors * roots) @ eigenvectors.T


def _check_psd(eigenvalues: np.ndarray, name: str) -> None:
    scale = max(float(np.abs(eigenvalues).max(initial=0.0)), np.finfo(np.float64).tiny)
    smallest = float(eigenvalues.min(initial=0.0))
    if smallest < -NEGATIVE_TOLERANCE * scale:
        raise ValueError(f"{name} is not positive semi-definite: smallest eigenvalue {smallest:.3g} against "
                         f"largest {scale:.3g}; pass a covariance matrix (e.g. from feature_statistics)")


def _as_features(features, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {array.shape}")
    _check_finite(array, name)
    return array


def _as_vector(vector, name: str) -> np.ndarray:
    array = np.atleast_1d(np.asarray(vector, dtype=np.float64))
    if array.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {array.shape}")
    _check_finite(array, name)
    return array


def _as_covariance(matrix, name: str) -> np.ndarray:
    array = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {array.shape}")
    _check_finite(array, name)
    asymmetry = float(np.abs(array - array.T).max(initial=0.0))
    if asymmetry > 1e-6 * max(float(np.abs(array).max(initial=0.0)), 1e-300):
        raise ValueError(f"{name} is not symmetric (max |S - S^T| = {asymmetry:.3g}); pass a covariance matrix")
    return (array + array.T) / 2


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values (a diverged model's samples?); "
                         "metrics of non-finite features are meaningless")
