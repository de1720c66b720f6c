"""Write a source as WebDataset shards plus the index.json that describes them.

    gentrain data pack digits --out data/digits --per-shard 512

Each split becomes `{split}-000000.tar`, `{split}-000001.tar`, ...; a sample is
`{__key__: "train-000123", png: <PNG bytes>, cls: b"7"}`. `index.json` is written
last and atomically, so a folder with an index always holds complete shards: a
crash mid-pack leaves a folder that readers refuse (no index) rather than one
they half-read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from gentrain.data.sources import SPLITS, open_source, require_source

INDEX_NAME = "index.json"
INDEX_FORMAT = "gentrain-shards"
INDEX_VERSION = 1
# A fixed tar mtime makes a repack of the same source byte-identical, so the
# content hash identifies the data rather than the moment it was packed. It is
# an int because a float mtime makes tarfile add a pax header to every member.
_TAR_MTIME = 0
_PROGRESS_EVERY_S = 1.0
_SHARD_NAME = re.compile(r"^(?:%s)-\d{6}\.tar$" % "|".join(SPLITS))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 H x W x C image (C=1 as mode L, C=3 as RGB)."""
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def pack_source(
    source: str,
    out_dir,
    per_shard: int = 512,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Pack a built-in source into `out_dir`; returns the index that was written."""
    require_source(source)
    if per_shard < 1:
        raise ValueError(f"per_shard must be at least 1 (--per-shard), got {per_shard}")
    out = Path(out_dir)
    started = time.monotonic()
    _say(progress, f"pack {source}: loading")
    split_source = open_source(source, test_fraction=test_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_pack(out)

    splits = {}
    for split in SPLITS:
        splits[split] = _write_split(split_source, split, out, per_shard, progress)

    height, width, channels = split_source.image_shape
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "source": source,
        "shape": [channels, height, width],
        "dtype": "uint8",
        "encoding": "png",
        "num_classes": len(split_source.class_names),
        "class_names": list(split_source.class_names),
        "test_fraction": test_fraction,
        "seed": seed,
        "splits": splits,
        "content_hash": content_hash(out, splits),
    }
    _write_json_atomically(out / INDEX_NAME, index)
    totals = ", ".join(f"{name} {info['total']}" for name, info in splits.items())
    _say(progress, f"pack {source}: done in {time.monotonic() - started:.1f}s ({totals}) -> {out / INDEX_NAME}")
    return index


def _write_split(split_source, split: str, out: Path, per_shard: int, progress: bool) -> dict:
    """Write one split's shards; counts come from what the writer actually put in each file."""
    total = split_source.count(split)
    counts: dict[str, int] = {}
    last_report = time.monotonic()
    if total == 0:
        return {"shards": [], "counts": [], "total": 0}
    # ShardWriter formats the pattern with %, so a literal % in the folder must be escaped.
    pattern = os.path.join(str(out).replace("%", "%%"), f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=_TAR_MTIME) as writer:
        for position, (image, label) in enumerate(split_source.samples(split)):
            key = f"{split}-{position:06d}"
            writer.write({"__key__": key, "png": encode_png(image), "cls": str(label).encode("ascii")})
            shard = os.path.basename(writer.fname)
            counts[shard] = counts.get(shard, 0) + 1
            if position + 1 == total or time.monotonic() - last_report >= _PROGRESS_EVERY_S:
                last_report = time.monotonic()
                _say(progress, f"pack: {split} {position + 1}/{total} samples, {len(counts)} shards")
    shards = sorted(counts)
    return {"shards": shards, "counts": [counts[name] for name in shards], "total": total}


def content_hash(out_dir, splits: dict) -> str:
    """sha256 over every shard's bytes, split by split, shard by shard, in index order."""
    digest = hashlib.sha256()
    for info in splits.values():
        for name in info["shards"]:
            with open(Path(out_dir) / name, "rb") as shard:
                for block in iter(lambda: shard.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def _clear_previous_pack(out: Path) -> None:
    """Remove an earlier pack's index first, then its shards, so no stale shard outlives a repack."""
    (out / INDEX_NAME).unlink(missing_ok=True)
    for entry in out.iterdir():
        if _SHARD_NAME.match(entry.name) and entry.is_file():
            entry.unlink()


def _write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
