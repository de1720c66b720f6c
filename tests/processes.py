"""Processes of a `gentrain run` started by a test (tests/ is on sys.path: rootdir conftest)."""

from __future__ import annotations

import psutil


def train_workers(root_pid: int) -> list[psutil.Process]:
    """Ray Train worker processes started under a `gentrain run` (its embedded Ray)."""
    found = []
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found
