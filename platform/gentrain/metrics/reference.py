"""Reference statistics of a data set: computed once per (data, split, extractor, sample count), cached as .npz.

    from gentrain.metrics.reference import load_or_compute_reference
    reference = load_or_compute_reference(batches, extractor, content_hash=index.content_hash,
                                          split="train", num_samples=50_000)
    reference.mu, reference.sigma      # FID's Gaussian over all num_samples features
    reference.features                 # at most max_features of them, for KID and precision/recall
    reference.path                     # the .npz, to log as an artifact

Extracting 50k Inception features takes minutes even on a GPU, and every evaluation
of every run against the same data needs the same numbers, so they are cached under
$GENTRAIN_CACHE/metrics-reference (default ~/.cache/gentrain/data/metrics-reference).
The key is the data index's content hash (which changes whenever a shard's bytes
do), the split, the extractor's name and the requested sample count. The file also
records its key, and a file whose key does not match, that cannot be read, or that
holds fewer stored features than asked for is recomputed rather than trusted.

The first `num_samples` images of `batches` are used, so pass an unshuffled,
deterministic iterator. The stored subset for KID/PR is a seeded uniform sample of
them (reservoir sampling), not the first ones, in case the data is ordered by class.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from gentrain.metrics.features import FeatureExtractor, iterate_features
from gentrain.metrics.frechet import RunningStatistics

FORMAT_VERSION = 1
CACHE_FOLDER = "metrics-reference"


@dataclass
class ReferenceStatistics:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    features: np.ndarray  # [min(count, max_features), D] float32
    extractor: str
    split: str
    content_hash: str
    requested_samples: int
    count: int  # samples actually seen: fewer than requested when the split is smaller
    path: Path
    from_cache: bool


def default_cache_dir() -> Path:
    # Imported here: the data package pulls in WebDataset, which pure metric use never needs.
    from gentrain.data.index import default_cache_dir as data_cache_dir

    return data_cache_dir() / CACHE_FOLDER


def reference_path(cache_dir, content_hash: str, split: str, extractor_name: str, num_samples: int) -> Path:
    """The cache file of one key; readable names, with a digest of the full key to keep them unique."""
    key = f"{content_hash}\n{split}\n{extractor_name}\n{num_samples}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{extractor_name}-{split}-n{num_samples}")
    return Path(cache_dir) / f"{readable}-{digest}.npz"


def load_or_compute_reference(batches: Iterable, extractor: FeatureExtractor, *, content_hash: str, split: str,
                              num_samples: int, cache_dir=None, max_features: int = 10_000, seed: int = 0,
                              progress: bool = True) -> ReferenceStatistics:
    """Cached statistics if a matching file exists (batches then untouched), else computed and saved."""
    if num_samples < 2 or max_features < 0:
        raise ValueError(f"num_samples ({num_samples}) must be at least 2 and max_features ({max_features}) >= 0")
    cached = find_cached_reference(extractor.name, content_hash=content_hash, split=split,
                                   num_samples=num_samples, cache_dir=cache_dir, max_features=max_features)
    if cached is not None:
        return cached
    running, reservoir = RunningStatistics(), _Reservoir(max_features, seed)
    for features, _ in iterate_features(extractor, batches, max_samples=num_samples, progress=progress):
        running.update(features)
        reservoir.add(features)
    return store_reference(running, reservoir.samples(), extractor.name, content_hash=content_hash, split=split,
                           num_samples=num_samples, cache_dir=cache_dir)


def find_cached_reference(extractor_name: str, *, content_hash: str, split: str, num_samples: int, cache_dir=None,
                          max_features: int = 10_000) -> ReferenceStatistics | None:
    """The cached statistics of this key, or None (then compute them and call store_reference)."""
    path = reference_path(cache_dir or default_cache_dir(), content_hash, split, extractor_name, num_samples)
    key = {"content_hash": content_hash, "split": split, "extractor": extractor_name,
           "requested_samples": num_samples}
    return _read_matching(path, key, max_features)


def store_reference(running: RunningStatistics, features: np.ndarray, extractor_name: str, *, content_hash: str,
                    split: str, num_samples: int, cache_dir=None) -> ReferenceStatistics:
    """Write statistics computed elsewhere (e.g. merged from many workers) under their cache key."""
    path = reference_path(cache_dir or default_cache_dir(), content_hash, split, extractor_name, num_samples)
    mu, sigma = running.statistics()
    reference = ReferenceStatistics(mu, sigma, np.asarray(features, dtype=np.float32), extractor_name, split,
                                    content_hash, num_samples, running.count, path, from_cache=False)
    _write(reference)
    return reference


def load_reference(path) -> ReferenceStatistics:
    """A reference .npz written by load_or_compute_reference (e.g. downloaded from a run's artifacts)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as archive:
        version = int(archive["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: reference format {version}, this gentrain reads {FORMAT_VERSION}")
        return ReferenceStatistics(
            mu=archive["mu"], sigma=archive["sigma"], features=archive["features"],
            extractor=str(archive["extractor"]), split=str(archive["split"]),
            content_hash=str(archive["content_hash"]), requested_samples=int(archive["requested_samples"]),
            count=int(archive["count"]), path=path, from_cache=True)


def _read_matching(path: Path, key: dict, max_features: int) -> ReferenceStatistics | None:
    if not path.is_file():
        return None
    try:
        reference = load_reference(path)
    except (OSError, ValueError, KeyError) as error:
        print(f"reference statistics: ignoring unreadable {path} ({error}); recomputing", file=sys.stderr)
        return None
    found = {name: getattr(reference, name) for name in key}
    if found != key:
        print(f"reference statistics: {path} was written for {found}, not {key}; recomputing", file=sys.stderr)
        return None
    if reference.features.shape[0] < min(max_features, reference.count):
        return None  # stored with a smaller cap than is asked for now
    return reference


def _write(reference: ReferenceStatistics) -> None:
    reference.path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a crash never leaves a half-written file
    # under the name later runs trust.
    temporary = reference.path.with_name(f".{reference.path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, format_version=FORMAT_VERSION, mu=reference.mu, sigma=reference.sigma,
                 features=reference.features, extractor=reference.extractor, split=reference.split,
                 content_hash=reference.content_hash, requested_samples=reference.requested_samples,
                 count=reference.count)
    os.replace(temporary, reference.path)


class _Reservoir:
    """A uniform random sample of at most `capacity` rows of a stream (Algorithm R), seeded."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.rows: np.ndarray | None = None
        self.filled = 0

    def add(self, batch: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.empty((self.capacity, batch.shape[1]), dtype=np.float32)
        for row in batch:
            if self.filled < self.capacity:
                self.rows[self.filled] = row
                self.filled += 1
            else:
                slot = int(self.rng.integers(0, self.seen + 1))
                if slot < self.capacity:
                    self.rows[slot] = row
            self.seen += 1

    def samples(self) -> np.ndarray:
        if self.rows is None:
            return np.empty((0, 0), dtype=np.float32)
        return self.rows[:self.filled].copy()
