"""Read the index.json that `gentrain data pack` writes, from a folder or a URL.

    gentrain data pack digits --out data/digits
    python -c "from gentrain.data.index import load_index; print(load_index('data/digits'))"

The index is what lets every rank agree on the epoch length before reading a
byte of data: shard names, samples per shard, image shape and classes. A
`builtin:NAME` source is packed into a local cache the first time it is used.
"""

from __future__ import annotations

import fcntl
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gentrain.data.pack import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, pack_source
from gentrain.data.sources import UnknownSourceError, known_sources

BUILTIN_PREFIX = "builtin:"
# The built-in sets are small (1,797 and 5,000 images): 128 per shard still
# gives enough shards for several ranks x loader workers to each get one.
BUILTIN_PER_SHARD = 128
_REQUIRED_KEYS = ("shape", "num_classes", "class_names", "splits", "content_hash")


class IndexNotFoundError(FileNotFoundError):
    """No index.json where a packed data set was expected."""


class InvalidIndexError(ValueError):
    """An index.json that is not one `gentrain data pack` wrote."""


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    total: int


@dataclass(frozen=True)
class DatasetIndex:
    """A packed data set: `location` is its folder (absolute path) or base URL."""

    location: str
    source: str
    shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    content_hash: str

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"data set {self.location} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Absolute paths (or URLs) of the split's shards, in index order."""
        return [_join(self.location, name) for name in self.split(split).shards]

    def total(self, split: str) -> int:
        return self.split(split).total


def load_index(location: str) -> DatasetIndex:
    """Read index.json from a folder, a path to index.json, or an http(s):// folder URL."""
    location = os.fspath(location)
    if _is_url(location):
        base = _strip_index_name(location.rstrip("/"))
        text = _read_url(base + "/" + INDEX_NAME)
    elif "://" in location:
        raise ValueError(
            f"data location {location!r}: unsupported scheme; use a local folder, a path to "
            f"{INDEX_NAME}, or an http(s):// URL of the folder"
        )
    else:
        path = Path(location).expanduser().absolute()
        index_path = path if path.name == INDEX_NAME and not path.is_dir() else path / INDEX_NAME
        base = str(index_path.parent)
        if not index_path.is_file():
            raise IndexNotFoundError(_missing_message(str(index_path), base))
        text = index_path.read_text(encoding="utf-8")
    return _parse(text, base)


def default_cache_dir() -> Path:
    """Where `builtin:NAME` sources are packed: $GENTRAIN_CACHE or ~/.cache/gentrain/data."""
    return Path(os.environ.get("GENTRAIN_CACHE") or Path.home() / ".cache" / "gentrain" / "data")


def resolve_builtin(source: str, cache_dir=None) -> str:
    """`builtin:NAME` -> a packed folder in the cache (packed on first use); anything else unchanged."""
    source = os.fspath(source)
    if not source.startswith(BUILTIN_PREFIX):
        return source
    name = source[len(BUILTIN_PREFIX) :]
    if name not in known_sources():
        raise UnknownSourceError(
            f"unknown data source {source!r}; known: {', '.join(BUILTIN_PREFIX + n for n in known_sources())}"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / name
    if (target / INDEX_NAME).is_file():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    # Ranks on one node start together: the lock makes one pack while the others
    # wait, then they find the finished index and reuse it.
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / INDEX_NAME).is_file():
                pack_source(name, target, per_shard=BUILTIN_PER_SHARD)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def _parse(text: str, base: str) -> DatasetIndex:
    where = _join(base, INDEX_NAME)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidIndexError(f"{where} is not valid JSON ({error}); repack with `gentrain data pack`") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise InvalidIndexError(f"{where} is not a gentrain shard index (format should be {INDEX_FORMAT!r})")
    if raw.get("version") != INDEX_VERSION:
        raise InvalidIndexError(
            f"{where} has index version {raw.get('version')!r}; this gentrain reads version {INDEX_VERSION}: "
            "repack with `gentrain data pack`"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise InvalidIndexError(f"{where} lacks {', '.join(missing)}; repack with `gentrain data pack`")
    splits = {name: _parse_split(info, f"{where}: splits.{name}") for name, info in raw["splits"].items()}
    return DatasetIndex(
        location=base,
        source=str(raw.get("source", "")),
        shape=tuple(int(size) for size in raw["shape"]),
        num_classes=int(raw["num_classes"]),
        class_names=tuple(str(name) for name in raw["class_names"]),
        splits=splits,
        content_hash=str(raw["content_hash"]),
    )


def _parse_split(info: dict, where: str) -> SplitInfo:
    shards, counts = tuple(info.get("shards", ())), tuple(int(c) for c in info.get("counts", ()))
    if len(shards) != len(counts) or sum(counts) != info.get("total"):
        raise InvalidIndexError(
            f"{where}: {len(shards)} shards, {len(counts)} counts summing to {sum(counts)}, "
            f"total {info.get('total')!r} do not agree; repack with `gentrain data pack`"
        )
    return SplitInfo(shards=shards, counts=counts, total=sum(counts))


def _read_url(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise IndexNotFoundError(_missing_message(url, url.rsplit("/", 1)[0])) from None
        raise OSError(f"could not read {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise OSError(f"could not reach {url}: {error.reason}; check the address and that the server is up") from None


def _missing_message(index_location: str, folder: str) -> str:
    return (
        f"no {INDEX_NAME} at {index_location}: pack a data set there with "
        f"`gentrain data pack SOURCE --out {folder}` (sources: {', '.join(known_sources())}), "
        f"or use `builtin:NAME` as the data source"
    )


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _strip_index_name(url: str) -> str:
    return url[: -len(INDEX_NAME) - 1] if url.endswith("/" + INDEX_NAME) else url


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if _is_url(base) else os.path.join(base, name)
