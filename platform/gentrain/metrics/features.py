"""Feature extractors for the metrics: the FID Inception network, or any classifier.

    from gentrain.metrics.features import InceptionFeatures, extract_features
    extractor = InceptionFeatures()                       # weights: path or $GENTRAIN_INCEPTION_WEIGHTS
    real = extract_features(extractor, batches, max_samples=10_000)   # real.features, real.logits

An extractor has a `name` (carried into every report, so FID under Inception is never
compared with FID under a digit classifier), a feature `dim`, and `__call__(images)`
mapping [N, C, H, W] in [0, 1] to [N, dim]. One that can also give class logits (for
the Inception Score) has `features_and_logits(images)`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from gentrain.metrics.inception import FIDInceptionV3
from gentrain.metrics.inception_weights import POOL_DIM

INCEPTION_NAME = "inception-v3-fid-2015-12-05"
_PROGRESS_EVERY_S = 1.0

FeatureFn = Callable[[nn.Module, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatures:
    """The FID Inception network as an extractor: 2048-d pool features and 1008-way logits.

    quantize=True rounds images to 8 bits first (clamped to [0, 1]): published numbers
    are computed on images saved as PNG/JPEG, and skipping this step measurably moves
    FID. logits_bias: see FIDInceptionV3.forward. A non-default choice shows in `name`.
    """

    dim = POOL_DIM

    def __init__(self, weights=None, device: str | torch.device | None = None, batch_size: int = 100,
                 quantize: bool = True, logits_bias: bool = False, network: FIDInceptionV3 | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = (network or FIDInceptionV3.from_weights(weights)).to(self.device).eval()
        self.batch_size = batch_size
        self.quantize = quantize
        self.logits_bias = logits_bias
        suffixes = ("" if quantize else "+float-input") + ("+logits-bias" if logits_bias else "")
        self.name = INCEPTION_NAME + suffixes
        self.weights_sha256 = self.network.weights_sha256

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    @torch.inference_mode()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pools, logits = [], []
        for chunk in _chunks(images, self.batch_size):
            chunk = chunk.to(self.device, torch.float32)
            if self.quantize:
                chunk = torch.round(chunk.clamp(0, 1) * 255) / 255
            pool, logit = self.network(chunk, logits_bias=self.logits_bias)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
        return torch.cat(pools), torch.cat(logits)


class ClassifierFeatures:
    """Any torch classifier as an extractor, e.g. one trained on 28x28 digits where Inception does not fit.

    `feature_layer_fn(model, images)` returns the features, or (features, logits) to
    enable the Inception Score. The model runs in eval mode under inference_mode, and
    is put back in training mode afterwards if it was in it.
    """

    def __init__(self, model: nn.Module, feature_layer_fn: FeatureFn, name: str, dim: int | None = None,
                 batch_size: int = 256):
        if not name:
            raise ValueError("ClassifierFeatures needs a name: reports carry it so numbers are never mixed up")
        self.model = model
        self.feature_layer_fn = feature_layer_fn
        self.name = name
        self.dim = dim  # None until the first call shows it, unless given
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    @torch.inference_mode()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = [self.feature_layer_fn(self.model, chunk.to(device, torch.float32))
                       for chunk in _chunks(images, self.batch_size)]
        finally:
            self.model.train(was_training)
        with_logits = isinstance(outputs[0], tuple)
        features = torch.cat([(out[0] if with_logits else out).flatten(1).float().cpu() for out in outputs])
        logits = torch.cat([out[1].float().cpu() for out in outputs]) if with_logits else None
        if self.dim is not None and features.shape[1] != self.dim:
            raise ValueError(f"{self.name!r} returned {features.shape[1]}-d features, dim={self.dim} was given")
        self.dim = features.shape[1]
        return features, logits


def features_and_logits(extractor: FeatureExtractor, images: torch.Tensor):
    """(features, logits or None) from any extractor."""
    method = getattr(extractor, "features_and_logits", None)
    if method is not None:
        return method(images)
    return extractor(images), None


@dataclass
class ExtractedFeatures:
    extractor: str
    features: np.ndarray  # [N, dim] float32
    logits: np.ndarray | None  # [N, classes] or None when the extractor gives none


def iterate_features(extractor: FeatureExtractor, batches: Iterable, max_samples: int | None = None,
                     progress: bool = True, total: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(features, logits) per batch as numpy, stopping after max_samples; progress on stderr.

    A batch is an image tensor [B, C, H, W] in [0, 1] or a data-pipeline dict with "image".
    """
    goal = max_samples if max_samples is not None else total
    meter = _Progress(progress, extractor.name, goal)
    seen = 0
    for batch in batches:
        images = _images_of(batch)
        if max_samples is not None:
            images = images[:max_samples - seen]
        features, logits = features_and_logits(extractor, images)
        seen += images.shape[0]
        meter.update(seen)
        yield features.numpy(), (logits.numpy() if logits is not None else None)
        if max_samples is not None and seen >= max_samples:
            break
    meter.close(seen)


def extract_features(extractor: FeatureExtractor, batches: Iterable, max_samples: int | None = None,
                     progress: bool = True, total: int | None = None) -> ExtractedFeatures:
    features, logits = [], []
    for batch_features, batch_logits in iterate_features(extractor, batches, max_samples, progress, total):
        features.append(batch_features)
        logits.append(batch_logits)
    if not features:
        raise ValueError(f"no images to extract features from ({extractor.name}): the batches were empty")
    stacked_logits = np.concatenate(logits) if all(item is not None for item in logits) else None
    return ExtractedFeatures(extractor.name, np.concatenate(features), stacked_logits)


def _images_of(batch) -> torch.Tensor:
    images = batch["image"] if isinstance(batch, dict) else batch
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("a batch must be an image tensor [B, C, H, W] in [0, 1] or a dict with 'image'; "
                         f"got {type(images).__name__} {getattr(images, 'shape', '')}")
    return images


def _chunks(images: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], size):
        yield images[start:start + size]


class _Progress:
    """Samples done, samples/s and ETA on stderr, at most once a second (and once at the end)."""

    def __init__(self, enabled: bool, name: str, total: int | None):
        self.enabled, self.name, self.total = enabled, name, total
        self.started = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if time.monotonic() - self.last >= _PROGRESS_EVERY_S:
            self._report(done)

    def close(self, done: int) -> None:
        self._report(done)

    def _report(self, done: int) -> None:
        self.last = time.monotonic()
        if not self.enabled:
            return
        rate = done / max(self.last - self.started, 1e-9)
        line = f"features ({self.name}): {done}"
        if self.total:
            remaining = max(self.total - done, 0)
            line += f"/{self.total} samples, {rate:.0f} samples/s, ETA {remaining / rate if rate else 0:.0f}s"
        else:
            line += f" samples, {rate:.0f} samples/s"
        print(line, file=sys.stderr, flush=True)
