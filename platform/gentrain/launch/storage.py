"""Full and read-only storage: one clear error naming `storage_path`, never a traceback.

    gentrain run vae/debug storage_path=/mnt/small     # full mid-run: the run fails, the rerun continues

A run writes its checkpoints, sample grids and MLflow spool under `storage_path`. When
that disk is full or read-only:

- before anything starts (`check_writable`, on the driver, before the MLflow run opens):
  the run is refused naming the folder and the fix, and nothing is left RUNNING;
- mid-run, a worker's write fails (Ray Train's copy of a checkpoint into storage, a
  sample grid); Ray Train treats it like any worker error (retried up to
  `checkpoint.max_failures` times: space may have been freed meanwhile), and the run then
  fails with `storage_failure`'s one paragraph instead of the workers' tracebacks. The
  MLflow run is marked FAILED; a folder cut short by the full disk is never trusted
  (gentrain.checkpoint verifies every file's size and hash), so the same command continues
  from the newest good checkpoint once there is room.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from gentrain.paths import is_remote

# errno: what it means for the user, and what to do about it
_KINDS = {
    errno.ENOSPC: ("no space left on device", "free space there or set storage_path to a larger disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space there, raise the quota, or set storage_path to another disk"),
    errno.EROFS: ("read-only file system", "remount it read-write or set storage_path to a writable folder"),
}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")
_QUOTED_PATH = re.compile(r"'(/[^']+)'")


class StorageError(RuntimeError):
    """storage_path cannot be written (full, over quota, read-only)."""


def check_writable(storage_path: str, run_dir: str) -> None:
    """Refuse a run whose storage cannot be written (before Ray and MLflow start). Leaves
    nothing behind: folders it had to create for the probe are removed again (training
    creates the run folder itself; a refused run must leave storage as it was)."""
    if is_remote(run_dir):
        return
    folder = Path(run_dir)
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    probe = Path(run_dir) / ".gentrain-write-check"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)  # one block: a disk with no room left refuses it
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise StorageError(message(storage_path, run_dir, exc.errno, str(exc), before=True)) from None
    finally:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()


def storage_failure(error: BaseException, storage_path: str, run_dir: str) -> str | None:
    """One paragraph for a run that failed because its storage could not be written (the
    error may be Ray Train's TrainingFailedError carrying the workers' errors); None when
    the failure was something else."""
    if is_remote(run_dir):
        return None  # object storage is never "full": such an error is a worker's local disk
    found = _storage_errno(error, seen=set())
    if found is None:
        return None
    code, text = found
    paths = [Path(quoted) for quoted in _QUOTED_PATH.findall(text)]
    if paths and not any(path.is_relative_to(storage_path) for path in paths):
        return None  # another disk (a worker's temporary folder): the error as it is says more
    return message(storage_path, run_dir, code, text, before=False)


def message(storage_path: str, run_dir: str, code: int | None, text: str, before: bool) -> str:
    what, fix = _KINDS.get(code, ("cannot write there", "make it writable or set storage_path to another folder"))
    detail = " ".join(text.split())[:300]
    if before:
        return (f"storage_path {storage_path}: {what} ({detail}); nothing was started. "
                f"To fix: {fix}, then run the same command again.")
    from gentrain.checkpoint import newest_good_checkpoint

    choice = newest_good_checkpoint(run_dir)
    resume = (f"continue from step {choice.step} ({choice.folder})" if choice.folder
              else "start from step 0 (no complete checkpoint was written)")
    skipped = ""
    if choice.rejected:
        names = ", ".join(folder.name for folder, _ in choice.rejected)
        skipped = f" {names} {'was' if len(choice.rejected) == 1 else 'were'} cut short and will not be used."
    return (f"storage_path {storage_path}: {what} ({detail}).{skipped} To fix: {fix}, then run "
            f"the same command to {resume}.")


def _storage_errno(error: BaseException | None, seen: set) -> tuple[int | None, str] | None:
    """(errno, text) of the first full/read-only storage error in `error`, its causes and,
    for Ray Train's errors, the workers' errors."""
    if error is None or id(error) in seen:
        return None
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _KINDS:
        return error.errno, str(error)
    inner = [error.__cause__, error.__context__, getattr(error, "health_check_failure", None),
             getattr(error, "cause", None)]
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict):
        inner.extend(failures.values())
    for candidate in inner:
        if isinstance(candidate, BaseException):
            found = _storage_errno(candidate, seen)
            if found:
                return found
    # A worker's error that came back as text only (Ray's wrappers): its "[Errno N]".
    for match in _ERRNO_TEXT.finditer(str(error)):
        if int(match.group(1)) in _KINDS:
            line = next((line for line in str(error).splitlines() if match.group(0) in line), match.group(0))
            return int(match.group(1)), line.strip()
    return None
