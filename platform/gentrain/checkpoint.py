"""Checkpoint folders: `<storage_path>/<name>/step-00000100/`, metadata written last.

A folder whose `gentrain.json` is missing was never finished and is never loaded.
Ray Train persists each folder (ray.train.report(checkpoint=...,
checkpoint_dir_name=...)) and hands the latest back on restart; the driver reads the
metadata of the latest one to find the MLflow run to continue.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from gentrain.paths import is_remote

META_FILE = "gentrain.json"
MODEL_FILE = "model.pt"  # {network: fp32 state_dict}, independent of the strategy
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def write_meta(directory: str, meta: dict) -> None:
    """Write the metadata file atomically; call it after everything else is saved."""
    path = Path(directory) / META_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_meta(directory: str) -> dict | None:
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def complete_checkpoints(run_dir: str) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint under `run_dir`, oldest first."""
    if is_remote(run_dir):
        return []  # remote storage: Ray Train restores it; nothing to read here
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> tuple[Path, dict] | None:
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    _, folder = found[-1]
    return folder, read_meta(str(folder))
