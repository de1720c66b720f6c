"""Spec checks on names, paths, storage and secrets (part of gentrain.validation).

`spec_problems` runs in `validate`, the one place every command goes through;
`check_storage` runs in `load_job` only, because it touches this machine's file system
(a spec submitted to a cluster writes to the cluster's storage).
"""

from __future__ import annotations

import os
import unicodedata
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from gentrain.paths import is_local_path
from gentrain.redaction import describe, url_secret_problems

if TYPE_CHECKING:
    from gentrain.spec import JobSpec

NAME_MAX_CHARS = 100
NAME_MAX_BYTES = 255  # one path component on common file systems
_NAME_FIX = ("it names the run folder <storage_path>/<name>: use letters, digits, '-', '_' and '.', "
             "e.g. name=vae-debug")


def name_problems(name: str) -> list[str]:
    """`name` must be one safe path component (it is the run folder and the MLflow run name)."""
    if not name:
        return [f"name: is empty; {_NAME_FIX}"]
    bad = sorted({c for c in name if c in "/\\" or c.isspace()
                  or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:8])
        return [f"name: {describe(name)} contains {shown}; {_NAME_FIX}"]
    if name.startswith("."):
        return [f"name: {describe(name)} starts with '.' (hidden, or '.'/'..' leaving storage_path); "
                f"{_NAME_FIX}"]
    size = len(name.encode("utf-8"))
    if len(name) > NAME_MAX_CHARS or size > NAME_MAX_BYTES:
        return [f"name: {describe(name)} is {len(name)} characters ({size} bytes); at most "
                f"{NAME_MAX_CHARS} characters and {NAME_MAX_BYTES} bytes: shorten it"]
    return []


def expand_user(path: str, value: str) -> tuple[str, list[str]]:
    """(`value` with ~ or ~user expanded, problems): an unknown user is a problem, not a RuntimeError."""
    if not value.startswith("~"):
        return value, []
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        user = value[1:].split("/", 1)[0] or "(you)"
        return value, [f"{path}: {describe(value)}: there is no home folder for user {user!r} on this "
                       "machine to expand it; write the full path"]
    return expanded, []


def spec_problems(spec: "JobSpec") -> list[str]:
    """Names, local paths and secrets of a spec (each problem names the field and the fix)."""
    problems = name_problems(spec.name)
    if not spec.storage_path.strip():
        problems.append("storage_path: is empty; set the folder runs are written under, e.g. "
                        "storage_path=./runs (the default), /shared/runs or s3://bucket/runs")
    elif "\x00" in spec.storage_path:
        problems.append(f"storage_path: {describe(spec.storage_path)} contains a NUL character; "
                        "write a plain path")
    else:
        problems += expand_user("storage_path", spec.storage_path)[1]
    paths = {"data.source": spec.data.source, "eval.inception_weights": spec.eval.inception_weights}
    if spec.eval.extractor.startswith("classifier:"):
        paths["eval.extractor"] = spec.eval.extractor[len("classifier:"):]
    for path, value in paths.items():
        if value and is_local_path(value):
            problems += expand_user(path, value)[1]
    problems += url_secret_problems("tracking.uri", spec.tracking.uri)
    problems += url_secret_problems("data.source", spec.data.source)
    problems += url_secret_problems("eval.inception_weights", spec.eval.inception_weights)
    problems += url_secret_problems("eval.extractor", paths.get("eval.extractor"))
    return problems


def check_storage(spec: "JobSpec") -> list[str]:
    """Can this machine create and write `spec.storage_path`? Remote stores are not checked.

    The folders this creates to find out are removed again, so `validate` leaves no trace.
    """
    storage = spec.storage_path
    if not is_local_path(storage):
        return []
    for _ in range(4):
        problems = _check_local_storage(storage)
        if problems != [_RACED]:
            return problems
    return [f"storage_path: cannot create or write {describe(storage)}: it vanished each time it was made "
            "(another process removes it); choose a folder nothing else manages"]


_RACED = "raced"


def _check_local_storage(storage: str) -> list[str]:
    """check_storage's one attempt; [_RACED] when a folder it found or made vanished before
    the probe was written (another process checking the same spec removed the folder it had
    made: checked again)."""
    fix = ("runs write checkpoints under it: choose a folder you can write, e.g. "
           "storage_path=./runs, or remote storage such as s3://bucket/runs")
    created: list[Path] = []
    try:
        missing, existing = [], Path(storage)
        while not existing.exists() and existing != existing.parent:
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            return [f"storage_path: {describe(storage)}: {describe(str(existing))} is a file, not a "
                    f"folder; {fix}"]
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # another process (a second rank checking the same spec) made it
                if not folder.is_dir():
                    raise
                continue  # not ours to remove afterwards
            created.append(folder)
        probe = Path(storage) / f".gentrain-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
        except FileNotFoundError:
            if not Path(storage).is_dir():  # it was there a moment ago: another process removed it
                return [_RACED]
            raise
        probe.unlink()
    except OSError as exc:
        where = f" ({describe(exc.filename)})" if exc.filename and exc.filename != storage else ""
        return [f"storage_path: cannot create or write {describe(storage)}: "
                f"{exc.strerror or exc}{where}; {fix}"]
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
    return []
