"""Image folders in ImageNet's layout: one subfolder per class, images inside.

    gentrain data pack data/flowers --out data/flowers-64 --image-size 64 --workers 8

    flowers/daisy/0001.jpg            flowers/train/daisy/0001.jpg
    flowers/rose/0002.png       or    flowers/val/daisy/0107.jpg   (or test/)

Files ending in .png, .jpg, .jpeg or .webp (any case) are read, searched
recursively inside each class folder; other files and hidden folders are
ignored. Class names are the sorted subfolder names (of `train/` when the
folder is split), and labels their positions in that list. When the folder
has `train/` beside `val/` or `test/` (`val/` wins when both exist) those are
the train and test splits; otherwise the whole folder is split by
--test-fraction and --seed.

Sizes: with --image-size N every image is resized (shorter side to N, bicubic)
and centre-cropped to N x N; without it every image must already share one
size. Colour: all images are stored in the mode of the majority, grayscale (L)
or RGB, counted over the whole folder (a tie gives RGB); the minority is
converted (colour to gray by luminance, gray to RGB by copying). Alpha is
dropped, and palette images count as RGB. Image headers are scanned before
anything is written, so a size mismatch fails before the first shard.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from gentrain.data.formats import SourceFormatError
from gentrain.data.sources import encode_png, fit_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
HELD_OUT_FOLDERS = ("val", "test")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_SCAN_CHUNK = 1000


@dataclass(frozen=True)
class FolderListing:
    """Every image file by split (relative paths, sorted) with its label."""

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, list[str]]
    labels: dict[str, list[int]]
    presplit: bool
    identity: str


@dataclass(frozen=True)
class ImageFileRows:
    """One shard's worth of image files; `encoded()` yields {"png", "cls"} per file, in order."""

    root: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    mode: str
    image_size: int | None
    expected_size: tuple[int, int] | None
    reference: str

    def encoded(self) -> Iterator[dict]:
        for path, label in zip(self.paths, self.labels):
            picture = _decode(os.path.join(self.root, path), self.mode)
            if self.image_size is not None:
                picture = fit_image(picture, self.image_size)
            elif picture.size != self.expected_size:
                raise SourceFormatError(_size_mismatch(self.reference, self.expected_size, path, picture.size))
            # Through an array so no metadata of the file (ICC profile, EXIF) rides along into the PNG.
            yield {"png": encode_png(np.asarray(picture).reshape(picture.height, picture.width, -1)),
                   "cls": str(label).encode("ascii")}


def is_image_folder(folder: Path) -> bool:
    return folder.is_dir() and any(entry.is_dir() and not entry.name.startswith(".") for entry in folder.iterdir())


def list_image_folder(root: Path) -> FolderListing:
    """Walk the class folders (and split folders, if any); raises when no image is found."""
    held_out = next((name for name in HELD_OUT_FOLDERS if (root / name).is_dir()), None)
    presplit = (root / "train").is_dir() and held_out is not None
    split_roots = {"train": root / "train", "test": root / held_out} if presplit else {"all": root}
    class_names = tuple(_class_folders(split_roots.get("train", root)))
    if not class_names:
        raise SourceFormatError(f"{root}: no class subfolders; put the images in one folder per class")
    digest = hashlib.sha256()
    files, labels = {}, {}
    for split, split_root in split_roots.items():
        unknown = sorted(set(_class_folders(split_root)) - set(class_names))
        if unknown:
            raise SourceFormatError(
                f"{split_root}: class folders {unknown[:5]} are not in {root / 'train'}; every held-out class "
                "needs a train folder of the same name"
            )
        files[split], labels[split] = [], []
        for label, name in enumerate(class_names):
            for relative, size, mtime in _image_files(root, split_root / name):
                files[split].append(relative)
                labels[split].append(label)
                digest.update(f"{relative}\t{size}\t{mtime}\n".encode())
    if not any(files.values()):
        raise SourceFormatError(f"{root}: no {', '.join(IMAGE_EXTENSIONS)} files in its class folders")
    return FolderListing(root, class_names, files, labels, presplit, "sha256:" + digest.hexdigest())


def choose_layout(
    listing: FolderListing, image_size: int | None, mapper: Callable = map
) -> tuple[str, tuple[int, int] | None, str]:
    """From every header: mode ("L" or "RGB"), the common (width, height) (None with
    --image-size), and the file that size was taken from (for later mismatch errors).

    `mapper` is `map` or a process pool's `map`: reading a million headers is
    worth spreading over the packing workers.
    """
    paths = [path for split_files in listing.files.values() for path in split_files]
    chunks = [(str(listing.root), paths[start : start + _SCAN_CHUNK]) for start in range(0, len(paths), _SCAN_CHUNK)]
    headers = [header for chunk in mapper(scan_headers, chunks) for header in chunk]
    gray = sum(1 for _, _, channels in headers if channels == 1)
    mode = "L" if gray > len(headers) - gray else "RGB"
    if image_size is not None:
        return mode, None, paths[0]
    reference = (headers[0][0], headers[0][1])
    for path, (width, height, _) in zip(paths, headers):
        if (width, height) != reference:
            raise SourceFormatError(_size_mismatch(paths[0], reference, path, (width, height)))
    return mode, reference, paths[0]


def scan_headers(chunk: tuple[str, list[str]]) -> list[tuple[int, int, int]]:
    """(width, height, channels 1 or 3) of each file, from its header only."""
    root, paths = chunk
    headers = []
    for path in paths:
        with _open(os.path.join(root, path)) as picture:
            channels = 1 if picture.mode in _GRAY_MODES else 3
            headers.append((picture.width, picture.height, channels))
    return headers


def _open(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as error:
        raise SourceFormatError(f"cannot read image {path} ({error}); fix or remove the file") from None


def _decode(path: str, mode: str) -> Image.Image:
    """The whole image in `mode`; a file that is cut short fails here, after its header passed the scan."""
    with _open(path) as picture:
        try:
            return picture.convert(mode)
        except OSError as error:
            raise SourceFormatError(f"cannot decode image {path} ({error}); fix or remove the file") from None


def _size_mismatch(first: str, first_size, other: str, other_size) -> str:
    return (
        f"images differ in size: {first} is {first_size[0]}x{first_size[1]} but {other} is "
        f"{other_size[0]}x{other_size[1]}; pass --image-size N to resize each image's shorter side to N and "
        "centre-crop it to N x N"
    )


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _image_files(root: Path, class_folder: Path) -> Iterable[tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of the class's images, sorted by path."""
    found = []
    for directory, subfolders, names in os.walk(class_folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                full = os.path.join(directory, name)
                stat = os.stat(full)
                found.append((os.path.relpath(full, root), stat.st_size, stat.st_mtime_ns))
    return sorted(found)
