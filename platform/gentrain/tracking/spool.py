"""A run's unsent tracking records on disk, and the final status the driver could not set.

    <spool_dir>/<run_id>/pending.jsonl      records RunLogger could not send yet, oldest first
    <spool_dir>/<run_id>/final_status.json  {"status": "FINISHED", "tracking_uri": ...}
    <spool_dir>/<run_id>/model.json         {"checkpoint": ..., "register_as": ...}: the
                                            trained model the driver could not log
    <spool_dir>/<run_id>/handoff/*.jsonl    rank 0's batches for the driver to send (a
                                            RunLogger with handoff=True; gentrain.tracking.relay),
                                            one file each, oldest name first
    <spool_dir>/<run_id>/staged/<id>/...    the copies the records above send (an artifact,
                                            a model): each goes once sent

The driver's spool_dir is `<run dir>/mlflow-spool` (spool_dir_for); `gentrain sync RUN_DIR`
sends what is there (gentrain.tracking.ending.sync_run).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from gentrain.paths import is_remote
from gentrain.tracking._limits import _METRICS_PER_BATCH

PENDING_FILE = "pending.jsonl"
FINAL_STATUS_FILE = "final_status.json"
TARGET_FILE = "tracking_uri"
MODEL_FILE = "model.json"
HANDOFF_DIR = "handoff"
STAGED_DIR = "staged"  # copies of artifacts and models a RunLogger has yet to send
_handoff_numbers = itertools.count()


def spool_dir_for(run_dir: str) -> str | None:
    """Where rank 0 spools for a run: beside its checkpoints; None for remote storage
    (s3://...), whose RunLogger spools in the worker's temp folder instead."""
    return None if is_remote(run_dir) else os.path.join(run_dir, "mlflow-spool")


class _Spool:
    """A run's unsent records on disk, one JSON object a line, oldest first."""

    def __init__(self, path: Path, uri: str | None = None):
        self.path, self.uri = path, uri

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, records: list[dict]) -> None:
        if records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target = self.path.parent / TARGET_FILE
            if self.uri and not target.exists():
                target.write_text(self.uri, encoding="utf-8")  # for `gentrain sync`
            with self.path.open("a", encoding="utf-8") as spool_file:
                spool_file.writelines(json.dumps(record) + "\n" for record in records)

    def read(self) -> list[dict]:
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a crash mid-append tears the last line; the lines before it are whole
        return records

    def rewrite(self, records: list[dict]) -> None:
        if not records:
            self.path.unlink(missing_ok=True)
            return
        partial = self.path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in records),
                           encoding="utf-8")
        os.replace(partial, self.path)


def _units(records: list[dict]):
    """(records consumed so far, one request's worth): consecutive metrics merge into one."""
    items: list[list] = []
    for index, record in enumerate(records):
        if record["op"] == "metrics":
            if items and len(items) + len(record["items"]) > _METRICS_PER_BATCH:
                yield index, {"op": "metrics", "items": items}
                items = []
            items.extend(record["items"])
            continue
        if items:
            yield index, {"op": "metrics", "items": items}
            items = []
        yield index + 1, record
    if items:
        yield len(records), {"op": "metrics", "items": items}


def write_handoff(folder: Path, records: list[dict]) -> None:
    """One batch for the driver: a file named by time, process and count (names sort in
    the order written, also across a restarted worker), appearing whole."""
    if not records:
        return
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}-{next(_handoff_numbers):08d}.jsonl"
    partial = folder / (name + ".partial")
    try:
        partial.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        os.replace(partial, folder / name)
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk: no half file left behind
        raise


def handoff_files(folder: Path) -> list[Path]:
    """The batches waiting in a handoff folder, oldest first."""
    try:
        return sorted(folder.glob("*.jsonl"))
    except OSError:
        return []


def absorb_handoff(run_folder: Path) -> None:
    """Move the batches a driver did not send (it was killed) into the run's spool, in
    order, for `sync_run`."""
    spool = _Spool(run_folder / PENDING_FILE)
    for path in handoff_files(run_folder / HANDOFF_DIR):
        spool.append(_Spool(path).read())
        path.unlink()


def record_final_status(folder: Path, status: str, uri: str) -> None:
    """Keep the status to set on disk before trying, so a server that is away (or a driver
    that dies now) loses nothing: `gentrain sync` sets it later."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (FINAL_STATUS_FILE + ".partial")
    partial.write_text(json.dumps({"status": status, "tracking_uri": uri, "time": time.time()}),
                       encoding="utf-8")
    os.replace(partial, folder / FINAL_STATUS_FILE)


def read_final_status(folder: Path) -> dict | None:
    try:
        return json.loads((folder / FINAL_STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def clear_final_status(folder: Path) -> None:
    """The run was marked (or continues: a rerun opened it RUNNING again)."""
    (folder / FINAL_STATUS_FILE).unlink(missing_ok=True)


def recorded_uri(folder: Path) -> str | None:
    """The tracking URI the spooled records were meant for, if known."""
    final = read_final_status(folder)
    if final and final.get("tracking_uri"):
        return final["tracking_uri"]
    try:
        return (folder / TARGET_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def record_model(folder: Path, checkpoint: str, register_as: str | None) -> None:
    """The trained model to log once the server is back (`gentrain sync`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_text(json.dumps({"checkpoint": checkpoint, "register_as": register_as}),
                                     encoding="utf-8")


def read_model(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def pending_count(folder: Path) -> int:
    """Metric points, tags, artifacts and a model waiting in folder's spool."""
    model = 1 if (folder / MODEL_FILE).exists() else 0
    path = folder / PENDING_FILE
    if not path.exists():
        return model
    return model + sum(len(record["items"]) if record.get("op") == "metrics" else 1
                       for record in _Spool(path).read())


def spooled_runs(spool_dir: str | Path) -> list[str]:
    """Run ids with something to send or to mark in `spool_dir`."""
    root = Path(spool_dir)
    if not root.is_dir():
        return []
    return sorted(folder.name for folder in root.iterdir() if folder.is_dir() and (
        (folder / PENDING_FILE).exists() or (folder / MODEL_FILE).exists()
        or read_final_status(folder) is not None or handoff_files(folder / HANDOFF_DIR)))
