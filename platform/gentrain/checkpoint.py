"""Checkpoint folders: `<storage_path>/<name>/step-00000100/`, verified before they are trusted.

    python -m gentrain.checkpoint runs/vae-debug     # which folder a rerun would continue from, and why

`gentrain.json` is written last and lists every file of the folder with its size and
sha256 (computed from what was written), beside the step and the data position. A folder
is good only when that metadata is present and consistent, every listed file is there
with its size and hash, and the model file loads: a folder without its metadata is never
used (weights without their step and data position would retrain from a wrong place), and
neither is one whose files were cut short. Ray Train copies the ranks' files into storage
in parallel, so "metadata last" alone does not hold there; the hashes do.

gentrain's own listing, not Ray Train's snapshot, decides where a run continues: the driver
("continuing ... from step-N") and the workers both call `newest_good_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gentrain.paths import is_remote

META_FILE = "gentrain.json"
MODEL_FILE = "model.pt"  # {network: fp32 state_dict}, independent of the strategy
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of reported checkpoints
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REQUIRED = ("step", "batches_consumed", "files")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def file_manifest(directory: str | os.PathLike, exclude: tuple[str, ...] = (META_FILE,)) -> dict[str, dict]:
    """{relative path: {"bytes": n, "sha256": hex}} of every file under `directory`."""
    root = Path(directory)
    manifest = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative not in exclude and not relative.endswith(".tmp"):
            manifest[relative] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return manifest


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_meta(directory: str, meta: dict) -> None:
    """Write the metadata file atomically; call it after everything else is saved (its
    `files` entry, the manifest, must describe the files as written)."""
    path = Path(directory) / META_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_meta(directory: str) -> dict | None:
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder, in one line; None when it can be trusted."""
    folder = Path(folder)
    if not folder.is_dir():
        return "folder is missing"
    try:
        meta = read_meta(str(folder))
    except (OSError, ValueError) as exc:
        return f"{META_FILE} is unreadable ({type(exc).__name__}: {exc})"
    if meta is None:
        return f"no {META_FILE} (never finished: weights without their step and data position)"
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        return f"{META_FILE} lacks {', '.join(missing)} (written by an older gentrain or cut short)"
    match = _STEP_DIR.match(folder.name)
    if match and int(match.group(1)) != meta["step"]:
        return f"{META_FILE} says step {meta['step']}, the folder's name says {int(match.group(1))}"
    files = meta["files"]
    if MODEL_FILE not in files:
        return f"{META_FILE} does not list {MODEL_FILE}"
    for name, expected in sorted(files.items()):
        problem = _file_problem(folder / name, name, expected)
        if problem:
            return problem
    try:
        import torch

        torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load means the same: not usable
        return f"{MODEL_FILE} does not load ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def _file_problem(path: Path, name: str, expected: dict) -> str | None:
    if not path.is_file():
        return f"{name} is missing (listed in {META_FILE})"
    size = path.stat().st_size
    if size != expected["bytes"]:
        hint = " (truncated?)" if size < expected["bytes"] else ""
        return f"{name} is {size:,} bytes, expected {expected['bytes']:,}{hint}"
    if sha256_of(path) != expected["sha256"]:
        return f"{name} has the right size but the wrong sha256 (corrupted or overwritten)"
    return None


@dataclass
class Choice:
    """Where a run continues: the newest good folder (None: from the start) and, newest
    first, every newer folder passed over with what was wrong with it."""

    folder: Path | None = None
    meta: dict | None = None
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.meta["step"]) if self.meta else 0

    def rejection_lines(self) -> list[str]:
        target = self.folder.name if self.folder else "the start (step 0)"
        return [f"not using {folder.name}: {problem}; falling back to {target}"
                for folder, problem in self.rejected]


def step_folders(run_dir: str) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder under `run_dir`, finished or not, oldest first."""
    root = Path(run_dir)
    if is_remote(run_dir) or not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def newest_good_checkpoint(run_dir: str) -> Choice:
    """The newest folder under `run_dir` that passes `checkpoint_problem`, and the newer ones
    that did not (remote storage: an empty choice; Ray Train's snapshot decides there)."""
    choice = Choice()
    for _, folder in reversed(step_folders(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            choice.folder, choice.meta = folder, read_meta(str(folder))
            return choice
        choice.rejected.append((folder, problem))
    return choice


def complete_checkpoints(run_dir: str) -> list[tuple[int, Path]]:
    """(step, folder) of every folder with its metadata file, oldest first (not verified:
    listings and previews; restores go through `newest_good_checkpoint`)."""
    return [(step, folder) for step, folder in step_folders(run_dir) if (folder / META_FILE).is_file()]


def latest_checkpoint(run_dir: str) -> tuple[Path, dict] | None:
    """The newest verified checkpoint and its metadata."""
    choice = newest_good_checkpoint(run_dir)
    return (choice.folder, choice.meta) if choice.folder else None


def forget_ray_snapshot(run_dir: str) -> bool:
    """Remove Ray Train's run snapshot from a local run folder before Ray starts on it.

    Ray Train V2 keeps `checkpoint_manager_snapshot.json` in `<storage_path>/<name>/` and,
    on start, refuses a run whose snapshot names a folder that is gone ("run snapshot
    contains a reference to a checkpoint that does not exist anymore"); otherwise it hands
    the newest *registered* folder back, which may be damaged, or older than a good folder
    it never registered (a worker killed right after reporting). gentrain's verified
    listing decides instead, on the driver and in the workers, so the snapshot carries
    nothing gentrain needs across runs: dropping it is simpler and more robust than
    editing Ray's internal format to prune entries. Within one run Ray keeps its
    registrations in memory (worker restarts, checkpoint.keep); folders from before this
    run are not pruned by Ray.
    """
    if is_remote(run_dir):
        return False  # remote storage: Ray's snapshot remains the source of truth there
    snapshot = Path(run_dir) / RAY_SNAPSHOT_FILE
    try:
        snapshot.unlink()
    except FileNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    run_dir = (argv or sys.argv[1:] or ["."])[0]
    choice = newest_good_checkpoint(run_dir)
    for line in choice.rejection_lines():
        print(line)
    print(f"continue from: {choice.folder or 'the start (no good checkpoint)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
