"""Pipeline stages that turn shard URLs into decoded samples, and the bad-shard policy.

    data.on_error: fail   # default: a bad shard stops the run, naming the shard and the fix
    data.on_error: skip   # drop what cannot be read, count it, train on

A shard is bad when it cannot be opened (missing file, HTTP 404, no access),
its tar stream breaks (truncated, garbage bytes), it holds fewer samples than
index.json says (a tar cut at a member boundary reads as a clean, short
archive: only the count gives it away), or one of its samples does not decode.
Errors are raised where the shard is read, never at start-up and never as a
hang. With `skip`, a failed shard counts its unread samples as skipped
(index count minus samples already read from it) and a bad sample counts one;
a reader does not retry a failed shard in the same epoch, and raises if every
shard it holds has failed, since it could never fill another batch.

Each stage runs inside its DataLoader worker; `ReadLog` counts there and the
pipeline hands the counts to the training process with each batch.
"""

from __future__ import annotations

import io
import itertools
import random
import re
import tarfile
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from webdataset.gopen import Pipe

from gentrain.data.errors import DataConfigError, ShardReadError, SkippedDataWarning
from gentrain.data.remote import open_stream

ON_ERROR = ("fail", "skip")
_FIX = "repack it (`gentrain data pack`) or, to train on without it, set `data.on_error: skip`"


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise DataConfigError(f"data.on_error: {on_error!r} is not one of {', '.join(map(repr, ON_ERROR))}")


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, worker count); (0, 1) when reading in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ReadLog:
    """One reader's (rank, loader worker, epoch) failed shards and skipped-sample count."""

    def __init__(self, on_error: str = "fail"):
        check_on_error(on_error)
        self.skip = on_error == "skip"
        self.failed: dict[str, str] = {}  # url -> why
        self.pending = 0  # skipped since the last batch left this reader

    def shard_failed(self, url: str, error: BaseException, lost: int, stream=None) -> None:
        reason = _describe(error, stream)
        if not self.skip:
            raise ShardReadError(f"cannot read shard {url}: {reason}; {_FIX}") from error
        self.failed[url] = reason
        self.pending += max(lost, 0)
        warnings.warn(f"data.on_error: skip: skipped shard {url} ({max(lost, 0)} unread samples): {reason}",
                      SkippedDataWarning, stacklevel=2)

    def sample_failed(self, sample: dict, error: BaseException) -> None:
        where = f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')}"
        if not self.skip:
            raise ShardReadError(f"cannot decode {where}: {_describe(error)}; {_FIX}") from error
        self.pending += 1
        warnings.warn(f"data.on_error: skip: skipped {where}: {_describe(error)}", SkippedDataWarning, stacklevel=2)

    def take(self) -> int:
        """Samples skipped since the previous call (attached to the next batch)."""
        count, self.pending = self.pending, 0
        return count


class ReaderShards:
    """Pipeline source: the shards one (rank, loader worker) reads in one epoch, as endless cycles.

    Dealt (the default): every rank shuffles the split's shards with the same
    (seed, epoch) seed and takes every world_size-th one, so ranks never share a
    shard; a rank's loader workers split its share the same way. Each cycle is
    the reader's own shards in a fresh order, so the epoch length is set by the
    batch count alone, and the next stage shuffles samples within a cycle only:
    no sample comes round twice before all of its reader's others have.
    Resampled: a single endless cycle of draws from the whole split with
    replacement, seeded by (seed, epoch, rank, worker).
    """

    def __init__(self, urls, rank: int, world_size: int, seed: int, epoch: int, log: ReadLog,
                 resampled: bool = False):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.epoch, self.log, self.resampled = seed, epoch, log, resampled

    def __call__(self):
        worker, workers = worker_slot()
        if self.resampled:
            return iter([self._draws(worker)])
        return self._cycles(worker, workers)

    def _cycles(self, worker: int, workers: int):
        urls = list(self.urls)
        # Same seed on every rank, so every rank sees the same deal and shares stay disjoint.
        random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(urls)
        mine = urls[self.rank :: self.world_size][worker::workers]
        for repeat in itertools.count():
            order = self._live(mine)
            random.Random(f"rank:{self.seed}:{self.epoch}:{self.rank}:{worker}:{repeat}").shuffle(order)
            yield order

    def _draws(self, worker: int):
        draws = random.Random(f"resample:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        while True:
            yield draws.choice(self._live(self.urls))

    def _live(self, urls: list[str]) -> list[str]:
        live = [url for url in urls if url not in self.log.failed]
        if not live:
            url, reason = next(iter(self.log.failed.items()))
            raise ShardReadError(
                f"every one of the {len(urls)} shards that rank {self.rank} (loader worker "
                f"{worker_slot()[0]}) reads failed (e.g. {url}: {reason}); data.on_error: skip needs at "
                "least one readable shard per reader: repack the bad shards (`gentrain data pack`)"
            )
        return live


class ShardSamples:
    """Shard URLs -> raw samples {__key__, __url__, png, cls}, checked against index counts."""

    def __init__(self, counts: dict[str, int], log: ReadLog, allow_pipe: bool = False):
        self.counts, self.log, self.allow_pipe = counts, log, allow_pipe

    def __call__(self, urls):
        for url in urls:
            yield from self._read(url)

    def _read(self, url: str):
        expected = self.counts.get(url, 0)
        try:
            stream = open_stream(url, allow_pipe=self.allow_pipe)
        except Exception as error:
            self.log.shard_failed(url, error, lost=expected)
            return
        yielded, held = 0, None
        try:
            # One sample is held back until the next one starts: a tar cut mid-sample ends
            # with a partial sample, which must be blamed on the shard, not decoded.
            for sample in tar_samples(stream, url):
                if held is not None:
                    yield held
                    yielded += 1
                held = sample
            stream.close()  # a curl pipe reports its exit status here
            read = yielded + (held is not None)
            if read != expected and url in self.counts:
                raise ShardReadError(f"it ends after {read} samples but index.json lists {expected} "
                                     "(truncated, or packed again after the index was written)")
        except GeneratorExit:
            # The epoch ended mid-shard: close without judging a stream we cut off ourselves.
            _close_quietly(stream)
            raise
        except Exception as error:
            _close_quietly(stream)
            self.log.shard_failed(url, error, lost=expected - yielded, stream=stream)
            return
        if held is not None:
            yield held


# WebDataset's naming: a sample's key is a file's path up to the first dot of its name; the
# rest is the entry ("0001.png" -> "0001", "png"). Names like __meta__ are not samples.
_KEY_AND_ENTRY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def tar_samples(stream, url: str):
    """{"__key__", "__url__", entry: bytes, ...} per sample of a tar stream, grouped as
    WebDataset's tar_file_expander + group_by_keys group them (adjacent files of one key;
    entries lower-cased; a repeated entry is an error), with less work per file: on small
    images that layer cost about a fifth of the pipeline's time."""
    sample = None
    # An uncompressed local file is read as plain `tarfile` reads one (random access:
    # headers straight from the file); a pipe, a download or a compressed tar as a stream,
    # through tarfile's block buffer (which also detects the compression).
    with tarfile.open(fileobj=stream, mode="r:" if _plain_file(stream) else "r|*") as tar:
        for member in tar:
            if not member.isreg() or _META.match(member.name):
                continue
            named = _KEY_AND_ENTRY.match(member.name)
            data = tar.extractfile(member).read()
            tar.members = []  # a stream: keep no member list
            if named is None:
                continue
            key, entry = named.group(1), named.group(2).lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if entry in sample:
                raise ValueError(f"{member.name}: the tar holds two '{entry}' files for sample {key!r}")
            sample[entry] = data
    if sample is not None:
        yield sample


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def _plain_file(stream) -> bool:
    """Whether `stream` is a seekable file that does not start as a compressed one."""
    try:
        if not stream.seekable():
            return False
        start = stream.tell()
        head = stream.read(6)
        stream.seek(start)
    except (AttributeError, OSError, ValueError):
        return False
    return not head.startswith(_COMPRESSED)


# Per-sample counts that BPE text samples carry beside their tokens (ASCII decimals):
# the UTF-8 bytes the sample stands for and those of its first token (context only).
COUNT_FIELDS = ("bytes", "first_bytes")


class SampleDecoder:
    """Stage: raw samples -> (tensor, label, key, counts) via decode_sample; `counts` holds
    the sample's COUNT_FIELDS that it has (BPE text); bad samples go to the log."""

    def __init__(self, shape, log: ReadLog, dtype: str = "uint8"):
        self.shape, self.log, self.dtype = tuple(shape), log, dtype

    def __call__(self, samples):
        for sample in samples:
            try:
                counts = {name: int(sample[name]) for name in COUNT_FIELDS if name in sample}
                decoded = (decode_sample(sample, self.shape, self.dtype), int(sample.get("cls", 0)),
                           sample["__key__"], counts)
            except Exception as error:
                self.log.sample_failed(sample, error)
                continue
            yield decoded


def decode_sample(sample: dict, shape, dtype: str = "uint8") -> torch.Tensor:
    """One shard sample -> a tensor: `png` or `npy` images (uint8 [C, H, W]; the batch is
    turned into floats at once by the collate step), or `tokens` (int64 [seq_len]) stored
    as the index's `dtype` (uint8 bytes; little-endian uint16/uint32 BPE tokens)."""
    if "png" in sample:
        return decode_image(sample["png"], shape, scale=False)
    if "npy" in sample:
        return _checked(torch.from_numpy(npy_array(sample["npy"])), shape)
    if "tokens" in sample:
        if dtype == "uint8":
            tokens = torch.frombuffer(bytearray(sample["tokens"]), dtype=torch.uint8)
            return _checked(tokens, shape).to(torch.int64)
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"token dtype {dtype!r} is not uint8, uint16 or uint32; repack with `gentrain data pack`")
        array = np.frombuffer(sample["tokens"], dtype=np.dtype(dtype).newbyteorder("<"))
        return _checked(torch.from_numpy(array.astype(np.int64)), shape)
    entries = sorted(key for key in sample if not key.startswith("__"))
    raise KeyError(f"no 'png', 'npy' or 'tokens' entry (it has {entries}); repack with `gentrain data pack`")


# Parsed .npy headers (dtype, shape, Fortran order, data offset) by their bytes: every sample
# of a shard set has the same header, and np.load parses it with `ast` each time, which cost
# more than the rest of decoding a small image.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}
_NPY_MAGIC = b"\x93NUMPY"


def npy_array(data: bytes) -> np.ndarray:
    """The array of one .npy file's bytes, as `np.load(..., allow_pickle=False)` reads it
    (a writable, C-contiguous copy); object arrays are refused, never unpickled."""
    end = _npy_header_end(data)
    parsed = _NPY_HEADERS.get(data[:end]) if end else None
    if parsed is None:
        if not end:  # not a .npy header numpy and we both know: numpy says what is wrong
            return np.ascontiguousarray(np.load(io.BytesIO(data), allow_pickle=False))
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        formats = np.lib.format
        read_header = formats.read_array_header_1_0 if version == (1, 0) else formats.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("the .npy sample holds Python objects, which are never unpickled; "
                             "repack the data set with `gentrain data pack`")
        if len(_NPY_HEADERS) >= 64:
            _NPY_HEADERS.clear()
        parsed = _NPY_HEADERS[data[:end]] = (dtype, tuple(shape), bool(fortran_order), end)
    dtype, shape, fortran_order, offset = parsed
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"the .npy sample is truncated: {len(data) - offset} bytes of data for shape "
                         f"{list(shape)} of {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return np.ascontiguousarray(array) if fortran_order else array.copy()


def _npy_header_end(data: bytes) -> int:
    """Where the data of .npy bytes begins (0 when the header is not a plain version 1-3 one)."""
    if len(data) < 12 or data[:6] != _NPY_MAGIC:
        return 0
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6] in (2, 3):
        return 12 + int.from_bytes(data[8:12], "little")
    return 0


def _checked(tensor: torch.Tensor, shape) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"a sample has shape {list(tensor.shape)} but the index says {list(shape)}: "
                         "the shards and index.json disagree; repack with `gentrain data pack`")
    return tensor


def decode_image(png: bytes, shape, scale: bool = True) -> torch.Tensor:
    """PNG bytes -> float32 [C, H, W] in [0, 1] (uint8 with scale=False); `shape` is the
    index's [C, H, W]."""
    channels, height, width = shape
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.array(image if image.mode == mode else image.convert(mode))
    # Shaped in numpy, then one tensor: per sample, each torch call costs more than numpy's.
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    tensor = _checked(torch.from_numpy(pixels), (channels, height, width))
    return tensor.to(torch.float32).div_(255.0) if scale else tensor


def _describe(error: BaseException, stream=None) -> str:
    """A one-line reason; WebDataset appends streams and URLs to error args, which we drop."""
    if isinstance(stream, Pipe) and stream.status not in (None, 0, 23, 141):
        detail = " (the server answered with an HTTP error such as 404)" if stream.status == 22 else ""
        return f"curl exited with status {stream.status}{detail}"
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    if isinstance(error, ShardReadError) and error.args:
        return str(error.args[0])
    # tar_file_iterator appends " @ <stream repr>" to the first argument.
    first = str(error.args[0]).split(" @ ")[0] if error.args else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - the stream is already being given up; its reason is reported elsewhere
        pass
