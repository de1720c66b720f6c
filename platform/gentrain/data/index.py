"""Read the index.json that `gentrain data pack` writes, from a folder or a URL.

    gentrain data pack digits --out data/digits
    python -c "from gentrain.data.index import load_index; print(load_index('data/digits'))"

The index is what lets every rank agree on the epoch length before reading a
byte of data: shard names, samples per shard, image shape and classes. A
`builtin:NAME` source is packed into a local cache the first time it is used.

The index is required: a bare shard pattern (`http://host/train-{000000..000099}.tar`)
as a data source is refused, because without per-shard sample counts no rank
can know the epoch length up front, and a truncated shard could not be told
from a short one. Inside index.json a shard name may itself be a brace pattern
(`"shards": ["train-{000000..000099}.tar"]`, one count per expanded name).

An index is data from whoever wrote it, so its shard names must stay inside its
own folder: no `pipe:` commands, no other URLs or absolute paths, no `..`.
`load_index(..., allow_pipe=True)` (the spec's `data.allow_pipe: true`) trusts
the index fully and lifts all three limits.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import braceexpand  # a dependency of webdataset, which expands shard patterns the same way

from gentrain.data import remote
from gentrain.data.errors import UnsafeURLError
from gentrain.data.pack import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, pack_source
from gentrain.data.sources import UnknownSourceError, known_sources
from gentrain.data.texts import TEXT_SOURCES

BUILTIN_PREFIX = "builtin:"
# The built-in sets are small (1,797 and 5,000 images): 128 per shard still
# gives enough shards for several ranks x loader workers to each get one.
BUILTIN_PER_SHARD = 128
_REQUIRED_KEYS = ("shape", "num_classes", "class_names", "splits", "content_hash")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


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
    shape: tuple[int, ...]  # one sample: [C, H, W] for images, [seq_len] for text
    num_classes: int
    class_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    content_hash: str
    # Loaded with allow_pipe: shard names may be pipe: commands or point anywhere.
    trusted: bool = False
    kind: str = "image"  # "image" (png or npy samples) or "text" (raw byte tokens); see registry.DataInfo
    vocab_size: int = 0  # text: tokens are 0 .. vocab_size - 1
    dtype: str = "uint8"  # text: how a sample's tokens are stored ("uint16" for BPE tokens)
    # A BPE pack's merges (left id, right id) in order, read from the file index.json names.
    merges: tuple[tuple[int, int], ...] = ()

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"data set {self.location} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Absolute paths (or URLs) of the split's shards, in index order."""
        return [_shard_url(self.location, name, self.trusted) for name in self.split(split).shards]

    def total(self, split: str) -> int:
        return self.split(split).total


def load_index(location: str, allow_pipe: bool = False) -> DatasetIndex:
    """Read index.json from a folder, a path to index.json, `builtin:NAME`, or a folder URL.

    URLs: http(s):// always; s3://, gs:// and other fsspec protocols when their
    package is installed (else MissingExtraError naming the extra). `allow_pipe`
    trusts the index (see the module docstring); without it, shard names that are
    commands, URLs, absolute paths or climb out with `..` raise UnsafeURLError.
    """
    location = os.fspath(location)
    if location.startswith(BUILTIN_PREFIX):
        location = resolve_builtin(location)
    _refuse_pattern(location)
    scheme = remote.url_scheme(location)
    if scheme == "file":
        location = urllib.request.url2pathname(urllib.parse.urlparse(location).path)
        scheme = ""
    if scheme == remote.PIPE_SCHEME:
        raise UnsafeURLError(
            f"data.source: {location!r} is a pipe: command; an index is read from a folder or a URL "
            "(pipe: commands may only name shards inside an index, with data.allow_pipe: true)"
        )
    if scheme in remote.CURL_SCHEMES:
        base = _strip_index_name(location.rstrip("/"))
        text = _read_url(base + "/" + INDEX_NAME)
    elif scheme:
        base = _strip_index_name(location.rstrip("/"))
        text = _read_fsspec(base + "/" + INDEX_NAME, base)
    else:
        path = Path(location).expanduser().absolute()
        index_path = path if path.name == INDEX_NAME and not path.is_dir() else path / INDEX_NAME
        base = str(index_path.parent)
        if not index_path.is_file():
            raise IndexNotFoundError(_missing_message(str(index_path), base))
        text = index_path.read_text(encoding="utf-8")
    index = _parse(text, base, trusted=allow_pipe)
    tokenizer = json.loads(text).get("tokenizer")
    if tokenizer:
        index = dataclasses.replace(index, merges=_read_merges(tokenizer, base, scheme, allow_pipe))
    return index


def _read_merges(tokenizer: dict, base: str, scheme: str, trusted: bool) -> tuple[tuple[int, int], ...]:
    """A BPE pack's merges file, checked against the sha256 index.json records."""
    import hashlib

    from gentrain.data.bpe import parse_merges

    where = _join(base, INDEX_NAME)
    name = str(tokenizer.get("merges", ""))
    if tokenizer.get("type") != "bpe" or not name:
        raise InvalidIndexError(f"{where}: tokenizer {tokenizer!r} is not a BPE with a merges file; repack with "
                                "`gentrain data pack --bpe-vocab`")
    if not trusted:
        _check_shard_name(name, where, base)
    location = _join(base, name)
    if scheme in remote.CURL_SCHEMES:
        text = _read_url(location)
    elif scheme:
        text = _read_fsspec(location, base)
    else:
        if not os.path.isfile(location):
            raise IndexNotFoundError(f"{where} names the BPE merges file {name} but {location} does not exist; "
                                     "copy it from the pack's folder or repack")
        text = Path(location).read_text(encoding="utf-8")
    bpe = parse_merges(text, location)
    if bpe.sha256() != tokenizer.get("merges_sha256"):
        raise InvalidIndexError(f"{location} does not match the merges_sha256 in {where} (it was changed after "
                                "packing): repack with `gentrain data pack`")
    return tuple(bpe.merges)


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
                text = TEXT_SOURCES.get(name)  # a bundled text: packed in its own sample length
                lengths = {} if text is None else {"seq_len": text[1]}
                pack_source(name, target, per_shard=BUILTIN_PER_SHARD, **lengths)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def _parse(text: str, base: str, trusted: bool = False) -> DatasetIndex:
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
    if not trusted:
        for info in splits.values():
            for name in info.shards:
                _check_shard_name(name, where, base)
    return DatasetIndex(
        location=base,
        source=str(raw.get("source", "")),
        shape=tuple(int(size) for size in raw["shape"]),
        num_classes=int(raw["num_classes"]),
        class_names=tuple(str(name) for name in raw["class_names"]),
        splits=splits,
        content_hash=str(raw["content_hash"]),
        trusted=trusted,
        kind=str(raw.get("kind", "image")),
        vocab_size=int(raw.get("vocab_size", 0) or 0),
        dtype=str(raw.get("dtype", "uint8")),
    )


def _parse_split(info: dict, where: str) -> SplitInfo:
    shards = tuple(expanded for name in info.get("shards", ()) for expanded in braceexpand.braceexpand(str(name)))
    counts = tuple(int(c) for c in info.get("counts", ()))
    if len(shards) != len(counts) or sum(counts) != info.get("total"):
        raise InvalidIndexError(
            f"{where}: {len(shards)} shards (after brace expansion), {len(counts)} counts summing to "
            f"{sum(counts)}, total {info.get('total')!r} do not agree; repack with `gentrain data pack`"
        )
    if len(set(shards)) != len(shards):
        # Per-shard counts are looked up by name: a repeated name would be read twice per epoch.
        raise InvalidIndexError(f"{where}: a shard is listed twice; repack with `gentrain data pack`")
    return SplitInfo(shards=shards, counts=counts, total=sum(counts))


def _check_shard_name(name: str, where: str, base: str) -> None:
    if remote.url_scheme(name) == remote.PIPE_SCHEME:
        problem = "is a pipe: command, which would run in a shell on every worker"
    elif remote.url_scheme(name):
        problem = "is a URL of its own"
    elif name.startswith(("/", "\\")) or os.path.isabs(name):
        problem = "is an absolute path"
    elif ".." in re.split(r"[/\\]", name):
        problem = "climbs out of the index's folder with '..'"
    elif not name.strip():
        problem = "is empty"
    else:
        return
    raise UnsafeURLError(
        f"{where}: shard name {name!r} {problem}; an index may only name shards inside its own folder "
        f"({base}). Repack with `gentrain data pack` so the shards sit beside index.json, or, for an index "
        "you trust, set data.allow_pipe: true (it trusts the index fully: pipe: commands and shards "
        "anywhere)"
    )


def _shard_url(base: str, name: str, trusted: bool) -> str:
    if trusted and remote.url_scheme(name):
        return name
    if trusted and name.startswith("/"):
        return urllib.parse.urljoin(base + "/", name) if remote.is_remote(base) else name
    return _join(base, name)


def _refuse_pattern(location: str) -> None:
    if _BRACES.search(location):
        raise IndexNotFoundError(
            f"data.source: {location!r} is a shard pattern; gentrain reads a folder or URL holding the "
            f"{INDEX_NAME} that `gentrain data pack` writes, because its per-shard sample counts give "
            "exact epochs and catch truncated shards. Point data.source at that folder; index.json may "
            "list its shards as a brace pattern"
        )


def _read_fsspec(url: str, folder: str) -> str:
    try:
        return remote.read_text(url)
    except FileNotFoundError:
        raise IndexNotFoundError(_missing_message(url, folder)) from None


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


def _strip_index_name(url: str) -> str:
    return url[: -len(INDEX_NAME) - 1] if url.endswith("/" + INDEX_NAME) else url


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if remote.is_remote(base) else os.path.join(base, name)
