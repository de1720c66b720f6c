"""Write a source as WebDataset shards plus the index.json that describes them.

    gentrain data pack digits --out data/digits --per-shard 512
    gentrain data pack data/imagenet --out data/in64 --image-size 64 --shard-size 256MB --workers 8

Each split becomes `{split}-000000.tar`, `{split}-000001.tar`, ...; an image
sample is `{__key__: "train-000123", png: <PNG bytes>, cls: b"7"}`, a text
sample `{__key__: ..., tokens: <seq_len raw uint8 bytes>}` (a BPE pack's tokens
are little-endian uint16, with `bytes` and `first_bytes`: the UTF-8 bytes the
sample and its first token stand for, as ASCII decimals). What SOURCE may be
is in `packable.py`.

Shards are independent units written by `workers` processes (spawned, each
writing whole shards), and the bytes of every shard depend only on the source
and the settings, never on `workers`. A rerun of an interrupted pack keeps the
shards that are already complete and writes only the rest (`shards.py`).
`index.json` is written last and atomically, so a folder with an index
always holds complete shards: a crash mid-pack leaves a folder that readers
refuse (no index) rather than one they half-read.

index.json: `kind` ("image" or "text"), `shape` ([C, H, W] or [seq_len]),
`dtype` ("uint8"; "uint16" for BPE tokens), `encoding` ("png", or "raw":
`np.frombuffer(tokens, "<" + dtype)`), `num_classes`, `class_names`, text's
`seq_len` and `vocab_size` (256, or the BPE vocabulary), BPE's `tokenizer`
({"type": "bpe", "merges": "merges.txt", "merges_sha256"}) and `text_bytes`
per split, `source`, `source_format`, `split_method` ("source", "seeded" or
"tail"), `per_shard`, and per split `shards`, `counts`, `total`, `bytes` and
`sha256` (one per shard), then `content_hash` over all shards and the
`pack_fingerprint` that a resumed pack must match.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from gentrain.data import shards
from gentrain.data.packable import DEFAULT_SEQ_LEN, Packable, open_packable
from gentrain.data.sources import SPLITS, encode_png  # noqa: F401  (encode_png: imported from here by bench)

INDEX_NAME = "index.json"
INDEX_FORMAT = "gentrain-shards"
INDEX_VERSION = 1
DEFAULT_PER_SHARD = 512
# Part of every pack's fingerprint: bump it when the bytes a pack writes change,
# so that a resumed pack never keeps shards written the old way.
PACK_LAYOUT = 2
_PROGRESS_EVERY_S = 1.0
_SIZE_SAMPLES = 32
_TAR_BLOCK = 512
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE_TEXT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(|k|m|g|t|ki|mi|gi|ti)b?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """"256MB", "1GB", "500kB", "64MiB", "1000000" -> bytes (k, M, G, T are powers of 1000; Ki, Mi, Gi of 1024)."""
    match = _SIZE_TEXT.match(str(text))
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()] if match else 0
    if size < 1:
        raise ValueError(f"{flag} {text!r} is not a size: write a positive number and a unit, e.g. 256MB, 1GB, "
                         "500kB or 64MiB")
    return int(size)


def pack_source(
    source: str,
    out_dir,
    per_shard: int | None = None,
    shard_size: str | int | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    image_size: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    bpe_vocab: int | None = None,
    bpe_merges=None,
) -> dict:
    """Pack `source` into `out_dir` (resuming an interrupted pack there); returns the index written.

    `per_shard` samples go in each shard; or `shard_size` ("256MB") sets it
    from the mean encoded size of up to 32 samples spread over the train
    split (a target, not a cap); neither gives 512. `image_size` resizes and
    centre-crops images to a square; `seq_len` is the text sample length (in
    tokens). Text only: `bpe_vocab` learns a byte-level BPE of that many tokens on
    the train split, `bpe_merges` reuses an earlier pack's merges.txt (packable.py).
    """
    shard_bytes = _check_settings(per_shard, shard_size, test_fraction, workers, image_size)
    out = Path(out_dir)
    started = time.monotonic()
    _say(progress, f"pack {source}: loading")
    with _process_pool(workers) as pool:
        packable = open_packable(source, test_fraction, seed, image_size, seq_len,
                                 mapper=pool.map if pool else map, bpe_vocab=bpe_vocab, bpe_merges=bpe_merges)
        if bpe_vocab is not None and packable.fields["vocab_size"] < bpe_vocab:
            _say(progress, f"pack {source}: the train split runs out of pairs to merge after "
                           f"{packable.fields['vocab_size']} of --bpe-vocab {bpe_vocab} tokens; packing with those")
        if not any(packable.counts.values()):
            raise ValueError(f"data source {source!r} holds no samples; nothing to pack")
        if shard_bytes is not None:
            per_shard = _per_shard_for(packable, shard_bytes)
            _say(progress, f"pack {source}: {per_shard} samples per shard for --shard-size {shard_size}")
        per_shard = per_shard or DEFAULT_PER_SHARD
        plan = _plan(packable, per_shard, str(out))
        fingerprint = _fingerprint(packable, per_shard, test_fraction, seed, image_size)
        out.mkdir(parents=True, exist_ok=True)
        kept, log = _prepare_folder(out, plan, fingerprint)
        for name, text in packable.files.items():
            _write_text_atomically(out / name, text)
        try:
            records = dict(kept)
            todo = [task for task in plan if task.name not in kept]
            for record in _write_shards(pool, workers, packable, todo, _Progress(progress, plan, kept)):
                records[record["name"]] = record
                log.append(record)
        finally:
            log.close()
    splits = _split_infos(plan, records)
    index = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "source": str(source),
        "source_format": packable.source_format, **packable.fields,
        "test_fraction": test_fraction, "seed": seed, "split_method": packable.split_method,
        "per_shard": per_shard, "splits": splits, "content_hash": content_hash(out, splits, packable.files),
        "pack_fingerprint": fingerprint,
    }
    _write_json_atomically(out / INDEX_NAME, index)
    log.remove()
    totals = ", ".join(f"{name} {info['total']}" for name, info in splits.items())
    _say(progress, f"pack {source}: done in {time.monotonic() - started:.1f}s ({totals}) -> {out / INDEX_NAME}")
    return index


def content_hash(out_dir, splits: dict, files=()) -> str:
    """sha256 over every shard's bytes, split by split, shard by shard, in index order, after
    each of `files` (names beside the shards, e.g. a BPE pack's merges.txt: two packs
    of one text with different vocabularies never share a hash)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(hashlib.sha256((Path(out_dir) / name).read_bytes()).digest())
    for info in splits.values():
        for name in info["shards"]:
            with open(Path(out_dir) / name, "rb") as shard:
                for block in iter(lambda: shard.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def _check_settings(per_shard, shard_size, test_fraction, workers, image_size) -> int | None:
    """Validate the knobs before any reading; returns --shard-size in bytes (or None)."""
    if per_shard is not None and shard_size is not None:
        raise ValueError("give per_shard (--per-shard) or shard_size (--shard-size), not both")
    if per_shard is not None and per_shard < 1:
        raise ValueError(f"per_shard must be at least 1 (--per-shard), got {per_shard}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1) (--test-fraction), got {test_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (--workers), got {workers}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be at least 1 (--image-size), got {image_size}")
    return None if shard_size is None else parse_size(shard_size)


@contextmanager
def _process_pool(workers: int):
    """A process pool for workers > 1 (None for 1: everything runs in this process).

    Not fork: the parent may hold threads (Ray, torch) that a fork would copy
    mid-lock. Forkserver where the platform has it, with this module preloaded
    in the server: importing gentrain.data pulls in torch, and paying that once
    rather than once per worker saved about 10 s per pack on a busy 2-core machine.
    """
    if workers == 1:
        yield None
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _per_shard_for(packable: Packable, shard_bytes: int) -> int:
    """Samples per shard so that a shard holds about `shard_bytes`, from a fixed spread of samples."""
    split = max(SPLITS, key=lambda name: packable.counts[name])
    total = packable.counts[split]
    positions = sorted({round(i * (total - 1) / max(1, _SIZE_SAMPLES - 1)) for i in range(min(total, _SIZE_SAMPLES))})
    sizes = []
    for position in positions:
        fields = next(iter(packable.rows(split, position, position + 1).encoded()))
        # Each member costs a 512-byte tar header plus its data padded to 512 bytes.
        sizes.append(sum(_TAR_BLOCK + math.ceil(len(value) / _TAR_BLOCK) * _TAR_BLOCK for value in fields.values()))
    return max(1, int(shard_bytes // (sum(sizes) / len(sizes))))


def _plan(packable: Packable, per_shard: int, out: str) -> list[shards.ShardTask]:
    """Every shard of every split; rows are attached lazily (see _write_shards)."""
    plan = []
    for split in SPLITS:
        for number, start in enumerate(range(0, packable.counts[split], per_shard)):
            count = min(per_shard, packable.counts[split] - start)
            plan.append(shards.ShardTask(out, shards.shard_name(split, number), split, start, count, None))
    return plan


def _fingerprint(packable: Packable, per_shard: int, test_fraction: float, seed: int, image_size) -> str:
    settings = {
        "layout": PACK_LAYOUT, "source_format": packable.source_format, "identity": packable.identity,
        "fields": packable.fields, "per_shard": per_shard, "test_fraction": test_fraction, "seed": seed,
        "image_size": image_size,
    }
    return "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _prepare_folder(out: Path, plan: list[shards.ShardTask], fingerprint: str):
    """Keep the earlier run's shards that still match; remove the index, stale shards and temporaries.

    Returns the kept records and a progress log that already lists them: it is
    written before the old index goes, so a crash in between loses no record.
    """
    planned = {task.name: task.count for task in plan}
    kept = {
        name: record for name, record in shards.earlier_records(out, fingerprint, INDEX_NAME).items()
        if planned.get(name) == record.get("count") and shards.still_valid(out / name, record)
    }
    log = shards.ProgressLog(out, fingerprint, list(kept.values()))
    # From here until the new index is written, readers must not trust this folder.
    (out / INDEX_NAME).unlink(missing_ok=True)
    for entry in out.iterdir():
        stale_shard = shards.SHARD_NAME.match(entry.name) and entry.name not in kept
        if (stale_shard or shards.is_temporary(entry.name)) and entry.is_file():
            entry.unlink()
    return kept, log


def _write_shards(pool, workers: int, packable: Packable, todo: list[shards.ShardTask], progress: "_Progress"):
    """Yield each shard's record as it finishes, in this process or across the pool.

    At most two shards per worker are in flight, so only their rows (pixels,
    bytes or paths) are held in memory, however large the source.
    """
    tasks = (_with_rows(packable, task) for task in todo)
    if pool is None:
        for task in tasks:
            record = shards.write_shard(task)
            progress.finished(record)
            yield record
        progress.close()
        return
    pending = set()
    while True:
        while len(pending) < 2 * workers:
            task = next(tasks, None)
            if task is None:
                break
            pending.add(pool.submit(shards.write_shard, task))
        if not pending:
            break
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda f: f.result()["name"]):
            progress.finished(future.result())
            yield future.result()
    progress.close()


def _with_rows(packable: Packable, task: shards.ShardTask) -> shards.ShardTask:
    rows = packable.rows(task.split, task.start, task.start + task.count)
    return shards.ShardTask(task.out_dir, task.name, task.split, task.start, task.count, rows)


def _split_infos(plan: list[shards.ShardTask], records: dict[str, dict]) -> dict:
    splits = {}
    for split in SPLITS:
        names = [task.name for task in plan if task.split == split]
        column = {key: [records[name][key] for name in names] for key in ("count", "bytes", "sha256")}
        splits[split] = {"shards": names, "counts": column["count"], "total": sum(column["count"]),
                         "bytes": column["bytes"], "sha256": column["sha256"]}
    return splits


class _Progress:
    """Samples done, samples/s and ETA on stderr, at most once a second (and once at the end)."""

    def __init__(self, enabled: bool, plan: list[shards.ShardTask], kept: dict[str, dict]):
        self.enabled = enabled
        self.total = sum(task.count for task in plan)
        self.shards_total = len(plan)
        self.done = sum(record["count"] for record in kept.values())
        self.shards_done = len(kept)
        self.written = 0
        self.started = self.last = time.monotonic()
        if kept:
            _say(enabled, f"pack: kept {len(kept)} complete shards ({self.done} samples) from an earlier run")

    def finished(self, record: dict) -> None:
        self.done += record["count"]
        self.written += record["count"]
        self.shards_done += 1
        if time.monotonic() - self.last >= _PROGRESS_EVERY_S:
            self._report()

    def close(self) -> None:
        self._report()

    def _report(self) -> None:
        self.last = time.monotonic()
        if self.written == 0 and self.done == self.total:
            _say(self.enabled, f"pack: all {self.shards_total} shards were already complete")
            return
        rate = self.written / max(self.last - self.started, 1e-9)
        remaining = self.total - self.done
        eta = _duration(remaining / rate) if rate > 0 else "unknown"
        _say(self.enabled, f"pack: {self.done}/{self.total} samples, {self.shards_done}/{self.shards_total} shards, "
                           f"{rate:.0f} samples/s, ETA {eta}")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


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
