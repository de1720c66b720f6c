"""Writing one shard, and the record of finished shards that lets a pack resume.

    gentrain data pack data/imagenet --out data/in64 --image-size 64 --workers 8   # Ctrl-C, then run it again

A shard is a self-contained unit of work (`ShardTask`: its name, its first
sample's position, and rows that carry their own data), so any process can
write any shard and the bytes depend only on the task. It is written under a
temporary name and renamed when complete; only then is it appended to the
progress log (`.gentrain-pack-progress.jsonl`: a header line with the pack's
fingerprint, then one line per finished shard with its sample count, size and
sha256). A rerun with the same fingerprint keeps every logged shard whose file
still matches its record. Once index.json is written the log is removed: the
index then carries the same records, so a finished pack resumes from it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from gentrain.data.sources import SPLITS

PROGRESS_NAME = ".gentrain-pack-progress.jsonl"
# A fixed tar mtime makes a repack of the same source byte-identical, so the
# content hash identifies the data rather than the moment it was packed. It is
# an int because a float mtime makes tarfile add a pax header to every member.
TAR_MTIME = 0
SHARD_NAME = re.compile(r"^(?:%s)-\d{6}\.tar$" % "|".join(SPLITS))
TEMPORARY_NAME = re.compile(r"^\.(?:%s)-\d{6}\.tar\.\d+\.tmp$" % "|".join(SPLITS))
_BLOCK = 1 << 20


@dataclass(frozen=True)
class ShardTask:
    """Write samples [start, start + count) of `split` from `rows` as `out_dir/name`."""

    out_dir: str
    name: str
    split: str
    start: int
    count: int
    rows: object


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def write_shard(task: ShardTask) -> dict:
    """Write the shard under a temporary name, rename it into place, return its record."""
    final = os.path.join(task.out_dir, task.name)
    temporary = os.path.join(task.out_dir, f".{task.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(temporary, "wb") as handle:
            with wds.TarWriter(_HashingSink(handle, digest), mtime=TAR_MTIME, encoder=False) as writer:
                for written, fields in enumerate(task.rows.encoded(), start=1):
                    writer.write({"__key__": f"{task.split}-{task.start + written - 1:06d}", **fields})
            # No fsync: a shard torn by a power cut fails its sha256 check on the next run and is rewritten.
            size = handle.tell()
        if written != task.count:
            raise RuntimeError(f"shard {task.name}: the source gave {written} samples where {task.count} were planned")
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return {"name": task.name, "count": written, "bytes": size, "sha256": digest.hexdigest()}


def is_temporary(name: str) -> bool:
    """A shard or progress log left half-written by a crashed pack."""
    return bool(TEMPORARY_NAME.match(name)) or (name.startswith(PROGRESS_NAME + ".") and name.endswith(".tmp"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def still_valid(path: Path, record: dict) -> bool:
    """The shard file exists with the size and sha256 its record says (cheap size check first)."""
    try:
        if path.stat().st_size != record["bytes"]:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(path) == record["sha256"]


def earlier_records(out: Path, fingerprint: str, index_name: str) -> dict[str, dict]:
    """Finished shards of an earlier run of the same pack: from its progress log, else from its index."""
    log = out / PROGRESS_NAME
    if log.is_file():
        return _records_from_log(log, fingerprint)
    try:
        index = json.loads((out / index_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(index, dict) or index.get("pack_fingerprint") != fingerprint:
        return {}
    records = {}
    for info in index.get("splits", {}).values():
        columns = [info.get(key, []) for key in ("shards", "counts", "bytes", "sha256")]
        if len({len(column) for column in columns}) != 1:
            return {}
        for name, count, size, sha in zip(*columns):
            records[name] = {"name": name, "count": count, "bytes": size, "sha256": sha}
    return records


def _records_from_log(log: Path, fingerprint: str) -> dict[str, dict]:
    lines = log.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        return {}
    if header.get("fingerprint") != fingerprint:
        return {}
    records = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            break  # a line torn by a crash ends the log; its shard is rewritten
        records[record["name"]] = record
    return records


class ProgressLog:
    """The append-only log of finished shards for one pack (see the module docstring)."""

    def __init__(self, out: Path, fingerprint: str, kept: list[dict]):
        self.path = out / PROGRESS_NAME
        temporary = out / f"{PROGRESS_NAME}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            for entry in [{"fingerprint": fingerprint}, *kept]:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
        os.replace(temporary, self.path)
        self._handle = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        # Flushed, not fsynced: a lost line only means its shard is written again.
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class _HashingSink:
    """A write-only file that hashes what passes through, so a shard is not read back to be hashed."""

    def __init__(self, handle, digest):
        self.handle, self.digest = handle, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()
