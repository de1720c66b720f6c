"""What `gentrain data pack SOURCE` can pack, told apart from the SOURCE argument alone.

    gentrain data pack digits --out data/digits                  # a built-in source
    gentrain data pack data/mnist --out data/mnist               # train-images-idx3-ubyte[.gz] and friends
    gentrain data pack data/cifar-10-batches-py --out data/c10   # or cifar-100-python, or their parent
    gentrain data pack data/imagenet --out data/in64 --image-size 64
    gentrain data pack faces.npz --out data/faces                # or images.npy (labels all 0)
    gentrain data pack shakespeare.txt --out data/shakespeare    # bytes for a text model
    gentrain data pack tinytales --out data/tinytales            # the bundled text (gentrain.data.texts)
    gentrain data pack corpus.txt --out data/c --bpe-vocab 4096  # byte-level BPE tokens (bpe.py)
    gentrain data pack other.txt --out data/o --bpe-merges data/c/merges.txt   # the same vocabulary

A registered built-in name wins over a file of the same name (write
`./digits` for the file). Every source becomes a `Packable`: how many samples
each split holds, the fields index.json records, an identity a resumed pack
must match, and `rows(split, start, stop)`, a small picklable object whose
`encoded()` yields the shard fields of those samples. Rows carry their own
data (pixels, bytes or file paths), so a packing process needs nothing else.

Splits are "train" and "test". A source that comes split (IDX, CIFAR, an
.npz with x_test, an image folder with val/) keeps its split; anything else
is split by --test-fraction and --seed. Image samples are written in a
seeded random order within each split. Text is UTF-8, stored as bytes
(vocabulary 256) in samples of `seq_len` bytes; the trailing `size % seq_len`
bytes are dropped, and the test split is the last --test-fraction of the file
rather than random chunks, because neighbouring chunks share their context.

With --bpe-vocab V (or --bpe-merges FILE) the text is split first, by bytes (the
last --test-fraction, from a character boundary, is the test split), merges are
learnt on the train part only, and each split's BPE tokens are cut into
consecutive samples of `seq_len` tokens (uint16 for V <= 65536), each split's
trailing `len % seq_len` tokens dropped. Each sample also records the UTF-8
bytes it covers and those of its first token, for bits per byte.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gentrain.data import formats, image_folder
from gentrain.data.texts import TEXT_SOURCES
from gentrain.data.sources import (
    SOURCES, SPLITS, ArraySource, SplitSource, UnknownSourceError, combine_splits, encode_png, fit_array,
    known_sources, split_indices,
)

BUILTIN_PREFIX = "builtin:"
TEXT_SUFFIXES = (".txt", ".text")
TEXT_VOCAB_SIZE = 256
DEFAULT_SEQ_LEN = 256
_CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
_UTF8_BLOCK = 1 << 24
_PATH_SOURCES = (
    "an image folder (class subfolders), a .npz or .npy file, a folder with MNIST IDX files, a CIFAR python "
    "folder, or a .txt file"
)


@dataclass(frozen=True)
class Packable:
    """A source ready to be cut into shards; see the module docstring."""

    source: str
    source_format: str
    kind: str
    counts: dict[str, int]
    fields: dict
    identity: dict
    split_method: str
    rows: Callable[[str, int, int], object]
    # Files written beside the shards (name -> text), each referenced from `fields`
    # and hashed into the index's content hash: a BPE pack's merges.txt.
    files: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImageArrayRows:
    """Images already in memory: uint8 [N, H, W, C] and labels [N]."""

    images: np.ndarray
    labels: np.ndarray
    image_size: int | None

    def encoded(self) -> Iterator[dict]:
        for image, label in zip(self.images, self.labels):
            if self.image_size is not None:
                image = fit_array(image, self.image_size)
            yield {"png": encode_png(image), "cls": str(int(label)).encode("ascii")}


@dataclass(frozen=True)
class TokenRows:
    """Consecutive `seq_len`-byte samples cut from `data`."""

    data: bytes
    seq_len: int

    def encoded(self) -> Iterator[dict]:
        for start in range(0, len(self.data), self.seq_len):
            yield {"tokens": self.data[start : start + self.seq_len]}


@dataclass(frozen=True)
class BpeTokenRows:
    """Samples of BPE tokens: `tokens` [n, seq_len] (uint16 or uint32), the UTF-8 bytes each
    sample covers and the bytes of its first token (context only, never predicted)."""

    tokens: np.ndarray
    covered: np.ndarray
    first: np.ndarray

    def encoded(self) -> Iterator[dict]:
        little = self.tokens.dtype.newbyteorder("<")
        for row, covered, first in zip(self.tokens, self.covered, self.first):
            yield {"tokens": row.astype(little).tobytes(), "bytes": str(int(covered)).encode("ascii"),
                   "first_bytes": str(int(first)).encode("ascii")}


def describe_sources() -> str:
    """One line for errors: what a SOURCE may be."""
    return f"a built-in source ({', '.join(known_sources())}), {_PATH_SOURCES}"


def open_packable(
    source: str,
    test_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    mapper: Callable = map,
    bpe_vocab: int | None = None,
    bpe_merges=None,
) -> Packable:
    """Read `source` far enough to know its splits, shape and classes (image folders: every header).

    Text only: `bpe_vocab` learns that many BPE tokens on the train split, `bpe_merges`
    reuses a merges file (see _bpe_text_packable); neither packs plain bytes.
    """
    source = os.fspath(source)
    name = source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else source
    if bpe_vocab is not None or bpe_merges is not None:
        return _open_bpe_text(source, name, test_fraction, seq_len, bpe_vocab, bpe_merges)
    if name in SOURCES:
        data = SOURCES[name]()
        return _array_packable(source, "builtin", data, {"builtin": name}, test_fraction, seed, image_size)
    if name in TEXT_SOURCES:
        text, _ = TEXT_SOURCES[name]
        return _bytes_text_packable(source, text(), {"builtin": name}, test_fraction, seq_len)
    if source.startswith(BUILTIN_PREFIX):
        raise UnknownSourceError(f"unknown data source {source!r}; known sources: {', '.join(known_sources())}")
    path = Path(source).expanduser()
    if not path.exists():
        raise UnknownSourceError(
            f"unknown data source {source!r}; known sources: {', '.join(known_sources())}; or give a path to "
            f"{_PATH_SOURCES} ({path} does not exist)"
        )
    if path.is_file():
        return _open_file(source, path, test_fraction, seed, image_size, seq_len)
    return _open_folder(source, path, test_fraction, seed, image_size, mapper)


def _open_file(source, path: Path, test_fraction, seed, image_size, seq_len) -> Packable:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        loaded = formats.load_npz(path)
    elif suffix == ".npy":
        loaded = formats.load_npy(path)
    elif suffix in TEXT_SUFFIXES:
        return _text_packable(source, path, test_fraction, seq_len)
    else:
        raise UnknownSourceError(f"data source {source!r}: cannot pack a {suffix or 'suffix-less'} file; give "
                                 f"{describe_sources()}")
    return _array_packable(source, suffix[1:], loaded, _file_identity(path), test_fraction, seed, image_size)


def _open_folder(source, path: Path, test_fraction, seed, image_size, mapper) -> Packable:
    if formats.idx_file(path, "train", "images") is not None:
        loaded = formats.load_idx_folder(path)
        identity = _file_identity(*formats.idx_files(path).values())
        return _array_packable(source, "idx", loaded, identity, test_fraction, seed, image_size)
    folder = next((path / child for child in _CIFAR_FOLDERS if formats.cifar_version(path / child)), path)
    version = formats.cifar_version(folder) if folder.is_dir() else None
    if version is not None:
        names = formats.CIFAR10_FILES if version == 10 else formats.CIFAR100_FILES
        loaded = formats.load_cifar_folder(folder)
        identity = _file_identity(*(folder / name for name in names))
        return _array_packable(source, f"cifar{version}", loaded, identity, test_fraction, seed, image_size)
    if image_folder.is_image_folder(path):
        return _folder_packable(source, path, test_fraction, seed, image_size, mapper)
    raise UnknownSourceError(f"data source {source!r}: the folder holds none of: class subfolders of images, "
                             "MNIST IDX files (train-images-idx3-ubyte[.gz], ...), CIFAR python batches")


def _array_packable(source, source_format, loaded, identity, test_fraction, seed, image_size) -> Packable:
    if isinstance(loaded, dict) and set(loaded) == {"train"}:
        loaded = loaded["train"]  # an .npz with x_train only: split it like an unsplit source
    if isinstance(loaded, dict):
        split_source, split_method = combine_splits(source, loaded, seed), "source"
    else:
        split_source = SplitSource(source, loaded, split_indices(len(loaded.images), test_fraction, seed))
        split_method = "seeded"
    height, width, channels = split_source.image_shape
    if image_size is not None:
        height = width = image_size
    data: ArraySource = split_source.data

    def rows(split: str, start: int, stop: int) -> ImageArrayRows:
        picked = split_source.indices[split][start:stop]
        return ImageArrayRows(np.ascontiguousarray(data.images[picked]), data.labels[picked].copy(), image_size)

    fields = _image_fields(split_source.class_names, channels, height, width, image_size)
    counts = {split: split_source.count(split) for split in SPLITS}
    return Packable(source, source_format, "image", counts, fields, identity, split_method, rows)


def _folder_packable(source, root: Path, test_fraction, seed, image_size, mapper) -> Packable:
    listing = image_folder.list_image_folder(root)
    mode, size, reference = image_folder.choose_layout(listing, image_size, mapper)
    if listing.presplit:
        orders = {split: np.random.default_rng([seed, number]).permutation(len(listing.files[split]))
                  for number, split in enumerate(SPLITS)}
        files = {split: [listing.files[split][i] for i in orders[split]] for split in SPLITS}
        labels = {split: [listing.labels[split][i] for i in orders[split]] for split in SPLITS}
    else:
        everything, all_labels = listing.files["all"], listing.labels["all"]
        orders = split_indices(len(everything), test_fraction, seed)
        files = {split: [everything[i] for i in orders[split]] for split in SPLITS}
        labels = {split: [all_labels[i] for i in orders[split]] for split in SPLITS}
    width, height = size if size is not None else (image_size, image_size)

    def rows(split: str, start: int, stop: int) -> image_folder.ImageFileRows:
        return image_folder.ImageFileRows(str(root), tuple(files[split][start:stop]),
                                          tuple(labels[split][start:stop]), mode, image_size, size, reference)

    fields = _image_fields(listing.class_names, 1 if mode == "L" else 3, height, width, image_size)
    identity = {"listing": listing.identity}
    counts = {split: len(files[split]) for split in SPLITS}
    return Packable(source, "image-folder", "image", counts, fields, identity,
                    "source" if listing.presplit else "seeded", rows)


def _text_split(where: str, size: int, test_fraction: float, seq_len: int) -> dict[str, int]:
    """Samples per split of `size` bytes: the train split first, the last test_fraction held out."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a token and the one that follows), got {seq_len}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1) (--test-fraction), got {test_fraction}")
    chunks = size // seq_len
    test = int(round(chunks * test_fraction))
    if chunks - test < 1:
        raise ValueError(f"{where} holds {size} bytes, too few for one train sample of seq_len {seq_len}: "
                         "use a longer text or a smaller seq_len")
    return {"train": chunks - test, "test": test}


def _text_fields(seq_len: int) -> dict:
    return {"kind": "text", "shape": [seq_len], "dtype": "uint8", "encoding": "raw", "seq_len": seq_len,
            "vocab_size": TEXT_VOCAB_SIZE, "num_classes": 0, "class_names": []}


def _text_packable(source, path: Path, test_fraction: float, seq_len: int) -> Packable:
    if seq_len < 2 or not 0.0 <= test_fraction < 1.0:
        _text_split(str(path), 0, test_fraction, seq_len)  # the settings' errors before reading the file
    _check_utf8(path)
    counts = _text_split(str(path), path.stat().st_size, test_fraction, seq_len)
    first = {"train": 0, "test": counts["train"]}

    def rows(split: str, start: int, stop: int) -> TokenRows:
        with open(path, "rb") as handle:
            handle.seek((first[split] + start) * seq_len)
            return TokenRows(handle.read((stop - start) * seq_len), seq_len)

    return Packable(source, "text", "text", counts, _text_fields(seq_len), _file_identity(path), "tail", rows)


def _bytes_text_packable(source, data: bytes, identity: dict, test_fraction: float, seq_len: int) -> Packable:
    """A bundled text already in memory (gentrain.data.texts), split like a .txt file."""
    counts = _text_split(f"built-in text {source!r}", len(data), test_fraction, seq_len)
    first = {"train": 0, "test": counts["train"]}

    def rows(split: str, start: int, stop: int) -> TokenRows:
        return TokenRows(data[(first[split] + start) * seq_len : (first[split] + stop) * seq_len], seq_len)

    return Packable(source, "text", "text", counts, _text_fields(seq_len), identity, "tail", rows)


def _open_bpe_text(source, name, test_fraction, seq_len, bpe_vocab, bpe_merges) -> Packable:
    if bpe_vocab is not None and bpe_merges is not None:
        raise ValueError("give --bpe-vocab (learn merges) or --bpe-merges (reuse them), not both")
    if seq_len < 2 or not 0.0 <= test_fraction < 1.0:
        _text_split(source, 0, test_fraction, seq_len)  # the settings' errors before reading the text
    if name in TEXT_SOURCES:
        data, identity = TEXT_SOURCES[name][0](), {"builtin": name}
    else:
        path = Path(source).expanduser()
        if not (path.is_file() and path.suffix.lower() in TEXT_SUFFIXES):
            raise UnknownSourceError(f"--bpe-vocab/--bpe-merges apply to text: {source!r} is not a .txt file "
                                     f"or a bundled text ({', '.join(TEXT_SOURCES)}); leave them out for other sources")
        _check_utf8(path)
        data, identity = path.read_bytes(), _file_identity(path)
    return _bpe_text_packable(source, data, identity, test_fraction, seq_len, bpe_vocab, bpe_merges)


def split_text_bytes(data: bytes, test_fraction: float) -> tuple[bytes, bytes]:
    """The train head and test tail of UTF-8 `data`: the tail holds about `test_fraction`
    of the bytes and starts at a character boundary."""
    cut = len(data) - int(round(len(data) * test_fraction))
    while 0 < cut < len(data) and 0x80 <= data[cut] < 0xC0:  # a continuation byte: move to the next character
        cut += 1
    return data[:cut], data[cut:]


def _bpe_text_packable(source, data: bytes, identity: dict, test_fraction: float, seq_len: int,
                       bpe_vocab: int | None, bpe_merges) -> Packable:
    """BPE tokens of a text, split before tokenising: the last `test_fraction` of the bytes
    (from a character boundary) is the test split, the rest the train split; merges are
    learnt on the train split only (or read from `bpe_merges`). Each split's tokens are cut
    into consecutive samples of `seq_len` tokens, its trailing `len % seq_len` tokens dropped."""
    from gentrain.data import bpe as bpe_module

    texts = dict(zip(("train", "test"), (part.decode("utf-8") for part in split_text_bytes(data, test_fraction))))
    if bpe_merges is not None:
        bpe = bpe_module.read_merges(bpe_merges)
    else:
        bpe = bpe_module.learn_merges(texts["train"], bpe_vocab)
    dtype = np.uint16 if bpe.vocab_size <= 1 << 16 else np.uint32
    lengths = bpe.token_lengths()
    samples, covered, first, counts = {}, {}, {}, {}
    for split in SPLITS:
        tokens = bpe.encode_array(texts[split])
        count = len(tokens) // seq_len
        tokens = tokens[: count * seq_len].reshape(count, seq_len)
        samples[split] = tokens.astype(dtype)
        covered[split] = lengths[tokens].sum(axis=1)
        first[split] = lengths[tokens[:, 0]]
        counts[split] = count
    if counts["train"] < 1:
        raise ValueError(f"{source}: its train split holds fewer than seq_len {seq_len} BPE tokens, too few for one "
                         "sample: use a longer text or a smaller --seq-len")

    def rows(split: str, start: int, stop: int) -> BpeTokenRows:
        return BpeTokenRows(samples[split][start:stop].copy(), covered[split][start:stop].copy(),
                            first[split][start:stop].copy())

    fields = {**_text_fields(seq_len), "dtype": np.dtype(dtype).name, "vocab_size": bpe.vocab_size,
              "tokenizer": {"type": "bpe", "merges": bpe_module.MERGES_NAME, "merges_sha256": bpe.sha256()},
              "text_bytes": {split: int(covered[split].sum()) for split in SPLITS}}
    return Packable(source, "text", "text", counts, fields, identity, "tail", rows,
                    files={bpe_module.MERGES_NAME: bpe.merges_text()})


def _image_fields(class_names, channels: int, height: int, width: int, image_size) -> dict:
    fields = {"kind": "image", "shape": [channels, height, width], "dtype": "uint8", "encoding": "png",
              "num_classes": len(class_names), "class_names": list(class_names)}
    if image_size is not None:
        fields["image_size"] = image_size
    return fields


def _check_utf8(path: Path) -> None:
    """Read the whole file through a strict UTF-8 decoder, block by block, naming the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_UTF8_BLOCK), b""):
            # A character cut by the block boundary waits in the decoder; error offsets count it.
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                raise formats.SourceFormatError(
                    f"{path} is not UTF-8 text: bad byte 0x{error.object[error.start]:02x} at offset "
                    f"{offset - pending + error.start}; convert it first (iconv -t UTF-8)"
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise formats.SourceFormatError(f"{path} is not UTF-8 text: it ends inside a character") from None


def _file_identity(*paths: Path) -> dict:
    """What a resumed pack compares: each input file's name, size and modification time."""
    files = []
    for path in paths:
        stat = path.stat()
        files.append({"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"files": files}
