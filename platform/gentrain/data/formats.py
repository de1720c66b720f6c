"""Readers for array files: MNIST IDX, CIFAR python batches, .npz and .npy.

    gentrain data pack data/fashion-mnist --out data/fashion      # the four IDX files
    gentrain data pack data/cifar-10-batches-py --out data/cifar10
    gentrain data pack data/faces.npz --out data/faces

Each reader returns an `ArraySource` (no split) or a dict of them by split
("train", "test") when the files come split. Files are checked against their
own headers, so a truncated download or a wrong file fails here with the
file's name rather than as garbage pixels later.

CIFAR batches are Python pickles, and unpickling can run code: only pack
CIFAR files you trust. They are read with a restricted unpickler that only
rebuilds numpy arrays, which blocks the common attacks, but it is not a
sandbox.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from gentrain.data.sources import ArraySource

IDX_PREFIXES = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_FILES = tuple(f"data_batch_{n}" for n in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
NPZ_IMAGE_KEYS = ("x", "images", "X", "image", "data")
NPZ_LABEL_KEYS = ("y", "labels", "Y", "label", "targets")
NPZ_CLASS_KEYS = ("class_names", "classes")
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class SourceFormatError(ValueError):
    """A source file whose content is not what its format promises."""


# ---- MNIST / Fashion-MNIST IDX ----------------------------------------------------------


def idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    """`train-images-idx3-ubyte` and its variants (`.gz`, `train-images.idx3-ubyte`), or None."""
    rank = "idx3" if kind == "images" else "idx1"
    for stem in (f"{prefix}-{kind}-{rank}-ubyte", f"{prefix}-{kind}.{rank}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (gzip or not, told apart by content) as an array of its dims."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise SourceFormatError(f"{path}: cannot read it ({error}); download the file again") from None
    if len(raw) < 4:
        raise SourceFormatError(f"{path}: {len(raw)} bytes is too short for an IDX header; download it again")
    magic = struct.unpack(">I", raw[:4])[0]
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if magic != expected_magic:
        raise SourceFormatError(
            f"{path}: IDX magic number 0x{magic:08x} is not 0x{expected_magic:08x} (unsigned bytes, {ndim} "
            f"dimension{'s' if ndim > 1 else ''}): not an MNIST {'image' if ndim == 3 else 'label'} file, or corrupt"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise SourceFormatError(f"{path}: the IDX header is cut short ({len(raw)} bytes); download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header_size
    if found != expected:
        shape = " x ".join(str(d) for d in dims)
        state = "truncated" if found < expected else "followed by extra bytes"
        raise SourceFormatError(
            f"{path}: header says {shape} = {expected} bytes of data but the file holds {found}: it is {state}; "
            "download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def idx_files(folder: Path) -> dict[tuple[str, str], Path | None]:
    """The four IDX files by (split, "images" or "labels"); None where one is missing."""
    return {(split, kind): idx_file(folder, prefix, kind)
            for split, prefix in IDX_PREFIXES.items() for kind in ("images", "labels")}


def load_idx_folder(folder: Path) -> dict[str, ArraySource]:
    """MNIST or Fashion-MNIST: train-* and t10k-* images and labels in one folder."""
    files = idx_files(folder)
    missing = [f"{IDX_PREFIXES[split]}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte[.gz]"
               for (split, kind), path in files.items() if path is None]
    if missing:
        raise SourceFormatError(f"{folder}: MNIST IDX folder lacks {', '.join(missing)}; put all four files there")
    parts = {}
    for split in IDX_PREFIXES:
        images = read_idx(files[split, "images"], 3)
        labels = read_idx(files[split, "labels"], 1)
        if len(images) != len(labels):
            raise SourceFormatError(
                f"{files[split, 'images'].name} holds {len(images)} images but {files[split, 'labels'].name} "
                f"holds {len(labels)} labels; the two files must come from the same download"
            )
        parts[split] = (images[..., None], labels.astype(np.int64))
    num_classes = max(int(labels.max(initial=0)) for _, labels in parts.values()) + 1
    fashion = "fashion" in str(folder.absolute()).lower() and num_classes <= len(FASHION_MNIST_CLASSES)
    # The files do not say which data set they hold; the folder name is the only hint.
    names = FASHION_MNIST_CLASSES[:num_classes] if fashion else tuple(str(n) for n in range(num_classes))
    return {split: ArraySource(images, labels, names) for split, (images, labels) in parts.items()}


# ---- CIFAR-10 / CIFAR-100 python batches ------------------------------------------------


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch only holds arrays")
        # Batches pickled by numpy 1.x name numpy.core, which numpy 2 keeps only as a deprecated alias.
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    """One CIFAR batch or meta file (pickled by Python 2, hence encoding="bytes")."""
    try:
        with open(path, "rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise SourceFormatError(f"{path}: not a readable CIFAR python batch ({error}); download it again") from None
    if not isinstance(batch, dict):
        raise SourceFormatError(f"{path}: a CIFAR batch is a dict, got {type(batch).__name__}")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def cifar_version(folder: Path) -> int | None:
    """10 or 100 when `folder` holds that CIFAR's python files, else None."""
    if (folder / "data_batch_1").is_file() or (folder / "batches.meta").is_file():
        return 10
    if all((folder / name).is_file() for name in CIFAR100_FILES):
        return 100
    return None


def load_cifar_folder(folder: Path) -> dict[str, ArraySource]:
    """`cifar-10-batches-py` (data_batch_1..5, test_batch) or `cifar-100-python` (train, test; fine labels)."""
    version = cifar_version(folder)
    expected = CIFAR10_FILES if version == 10 else CIFAR100_FILES
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise SourceFormatError(f"{folder}: CIFAR-{version} folder lacks {', '.join(missing)}; unpack the whole archive")
    meta_name, names_key, labels_key = (
        ("batches.meta", "label_names", "labels") if version == 10 else ("meta", "fine_label_names", "fine_labels")
    )
    meta = read_cifar_pickle(folder / meta_name)
    if names_key not in meta:
        raise SourceFormatError(f"{folder / meta_name}: no {names_key!r} in it (keys: {sorted(meta)})")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    batches = {"train": [n for n in expected if n.startswith(("data_batch", "train"))],
               "test": ["test_batch" if version == 10 else "test"]}
    parts = {}
    for split, batch_names in batches.items():
        loaded = [_cifar_batch(folder / name, labels_key) for name in batch_names]
        images = np.concatenate([images for images, _ in loaded])
        labels = np.concatenate([labels for _, labels in loaded])
        if labels.size and int(labels.max()) >= len(names):
            raise SourceFormatError(f"{folder}: label {int(labels.max())} but only {len(names)} class names")
        parts[split] = ArraySource(images, labels, names)
    return parts


def _cifar_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    if "data" not in batch or labels_key not in batch:
        raise SourceFormatError(f"{path}: expected keys 'data' and {labels_key!r}, found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[labels_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SourceFormatError(f"{path}: 'data' should be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if len(labels) != len(data):
        raise SourceFormatError(f"{path}: {len(data)} images but {len(labels)} labels")
    # Rows are channel-planar (1024 red, 1024 green, 1024 blue values).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


# ---- .npz / .npy ------------------------------------------------------------------------


def load_npy(path: Path) -> ArraySource:
    """Images only; every label is 0. Memory-mapped when already uint8 N x H x W x C."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise SourceFormatError(f"{path}: not a plain numeric .npy ({error})") from None
    images = as_uint8_images(array, str(path))
    return ArraySource(images, np.zeros(len(images), dtype=np.int64), ("0",))


def load_npz(path: Path) -> ArraySource | dict[str, ArraySource]:
    """`x`/`images` + `y`/`labels` (one set, split later), or `x_train`, `y_train`[, `x_test`, `y_test`]."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise SourceFormatError(f"{path}: not a readable .npz ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SourceFormatError(f"{path}: holds a single array, not an .npz archive; name it .npy")
    with archive:
        try:
            return _npz_sources(archive, path)
        except SourceFormatError:
            raise
        except (ValueError, zipfile.BadZipFile) as error:
            # allow_pickle=False refuses object arrays only when they are read, not at np.load.
            raise SourceFormatError(f"{path}: an array in it cannot be read ({error}); save plain numeric arrays") from None


def _npz_sources(archive, path: Path) -> ArraySource | dict[str, ArraySource]:
    keys = set(archive.files)
    names = _npz_class_names(archive, keys)
    if "x_train" in keys or "y_train" in keys:
        return _npz_presplit(archive, keys, path, names)
    image_key = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
    label_key = next((k for k in NPZ_LABEL_KEYS if k in keys), None)
    if image_key is None or label_key is None:
        raise SourceFormatError(
            f"{path}: found keys {sorted(keys)}; expected images under one of {', '.join(NPZ_IMAGE_KEYS)} and "
            f"labels under one of {', '.join(NPZ_LABEL_KEYS)}, or x_train/y_train/x_test/y_test "
            "(for images without labels save a .npy)"
        )
    return _array_source(archive[image_key], archive[label_key], f"{path}:{image_key}", names)


def _npz_presplit(archive, keys: set, path: Path, names) -> dict[str, ArraySource]:
    if not {"x_train", "y_train"} <= keys or ("x_test" in keys) != ("y_test" in keys):
        raise SourceFormatError(
            f"{path}: found keys {sorted(keys)}; a split .npz needs x_train and y_train, and x_test with y_test"
        )
    splits = ("train", "test") if "x_test" in keys else ("train",)
    images = {split: archive[f"x_{split}"] for split in splits}
    labels = {split: archive[f"y_{split}"] for split in splits}
    if names is None:
        top = max(int(np.max(values, initial=0)) for values in labels.values() if np.size(values))
        names = tuple(str(n) for n in range(top + 1))
    return {split: _array_source(images[split], labels[split], f"{path}:x_{split}", names) for split in splits}


def _npz_class_names(archive, keys: set) -> tuple[str, ...] | None:
    key = next((k for k in NPZ_CLASS_KEYS if k in keys), None)
    return None if key is None else tuple(str(name) for name in archive[key].tolist())


def _array_source(images, labels, where: str, names) -> ArraySource:
    images = as_uint8_images(images, where)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise SourceFormatError(f"{where}: labels must be integers [N], got {labels.dtype} {list(labels.shape)}")
    if labels.size and int(labels.min()) < 0:
        raise SourceFormatError(f"{where}: labels must be >= 0, found {int(labels.min())}")
    if names is None:
        names = tuple(str(n) for n in range(int(labels.max(initial=0)) + 1))
    if labels.size and int(labels.max()) >= len(names):
        raise SourceFormatError(f"{where}: label {int(labels.max())} but only {len(names)} class names")
    return ArraySource(images, labels.astype(np.int64), tuple(names))


def as_uint8_images(array: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W], [N, H, W, C] or [N, C, H, W] (C = 1 or 3) -> uint8 [N, H, W, C].

    uint8 is kept as is; other integers must lie in 0..255; floats in [0, 1]
    are scaled by 255 and floats up to 255 are rounded; booleans become 0/255.
    """
    if array.ndim == 3:
        array = array[..., None]
    elif array.ndim == 4 and array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise SourceFormatError(
            f"{where}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W] with 1 or 3 channels, got "
            f"{list(array.shape)}"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise SourceFormatError(f"{where}: images of dtype {array.dtype} are not numbers; save uint8 images")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if np.isnan(low) or np.isnan(high) or low < 0 or high > 255:
        raise SourceFormatError(f"{where}: pixel values span {low}..{high}; scale them to 0..255 (or 0..1 floats)")
    if np.issubdtype(array.dtype, np.floating) and high <= 1.0:
        array = array * 255.0
    return np.rint(array).astype(np.uint8)
