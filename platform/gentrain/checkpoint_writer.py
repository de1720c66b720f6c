"""Checkpoints written in the background (`checkpoint.asynchronous: true`).

    gentrain run vae/debug checkpoint.asynchronous=true

At the step, on the training thread, the engine takes a `Snapshot`: everything the folder
will hold (the strategy's `checkpoint_files` and, on rank 0, the metadata but for the
manifest), copied to host memory, so the steps that follow cannot change what is written.
A `CheckpointWriter` thread then writes the files, hashes them, merges the ranks'
manifests, writes `gentrain.json` last and (under Ray Train) reports the folder, while
training goes on. The guarantees of a synchronous save stay, moved to the next save:

- one at a time: a save first waits for the previous one (so at most two copies of the
  state are in memory: the one being written and the live one);
- the end: `Engine.fit` waits for the last one before it returns, so the final folder is
  complete (and reported) before the worker ends and the driver logs the model;
- errors: a failed write is raised on the training thread by the next save, the end of
  fit, or the first step after it failed (`raise_if_failed`), never lost;
- a worker killed while a folder is written leaves it without its metadata, or with files
  that do not match it: the next start rejects it and falls back, as for a synchronous save.

The writer's ranks talk over a process group of their own (gloo, made when the engine is
built): the manifest gather and the barrier of a write never interleave with the training
thread's collectives on the default group. DeepSpeed's engine writes its ZeRO shards
itself from the live partitions, so it has no snapshot form (spec.field_rules refuses it).
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gentrain.checkpoint import file_manifest, step_dir_name, write_meta


class CheckpointWriteError(RuntimeError):
    """A checkpoint written in the background failed; raised on the training thread."""


def host_copy(value: Any, tensors: bool = True) -> Any:
    """`value` with every tensor copied to CPU memory (a new tensor even when it is on the CPU
    already) and every container copied, so later steps cannot change it. `tensors=False`:
    the containers and other values only, for a state whose tensors are private copies already
    (the portable state: gentrain.strategies.portable clones what it gathers)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True) if tensors else value
    if isinstance(value, dict):
        return type(value)((key, host_copy(item, tensors)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(host_copy(item, tensors) for item in value)
    return copy.deepcopy(value)


def snapshot_files(files: dict[str, Any]) -> dict[str, Any]:
    """A strategy's `checkpoint_files` made private: copied to host memory, but for the
    portable state's tensors, which are copies already (the optimizer moments are most of
    a checkpoint: copying them twice is most of the time the loop waits)."""
    from gentrain.strategies.portable import PORTABLE_FILE

    return {name: host_copy(state, tensors=name != PORTABLE_FILE) for name, state in files.items()}


@dataclass
class Snapshot:
    """One rank's share of a checkpoint, in host memory, ready to be written anywhere."""

    files: dict[str, Any]  # {file name: object to torch.save}
    meta: dict | None  # rank 0: gentrain.json but for "files"; other ranks: None
    step: int
    stopped_at_time_budget: bool
    world_size: int
    group: Any = None  # the writer's process group (None: one process)

    @property
    def dir_name(self) -> str:
        return step_dir_name(self.step)

    def write(self, directory: str) -> None:
        """Write the files, then (rank 0) the metadata with every rank's manifest, last.
        A collective over the writer's group."""
        os.makedirs(directory, exist_ok=True)
        for name, state in self.files.items():
            torch.save(state, os.path.join(directory, name))
        self.barrier()  # ranks sharing a folder: every share is written before it is hashed
        manifest = gather_manifests(file_manifest(directory), self.world_size, self.group)
        if self.meta is not None:
            write_meta(directory, {"files": manifest, **self.meta})

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier(group=self.group)


class CheckpointWriter:
    """One background thread at a time writing checkpoints; its error is kept for the
    training thread to raise."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        # A group of its own (a collective: every rank builds its engine at the same point).
        distributed = world_size > 1 and torch.distributed.is_initialized()
        self.group = torch.distributed.new_group(backend="gloo") if distributed else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step = 0

    def start(self, step: int, write: Callable[[], None]) -> None:
        """Run `write` in the background (the previous write first waited for)."""
        self.wait()
        self._step = step

        def run() -> None:
            try:
                write()
            except BaseException as error:  # noqa: BLE001 - handed to the training thread
                self._error = error

        self._thread = threading.Thread(target=run, name=f"gentrain-checkpoint-{step}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in progress (if any) is done; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Raise the error of a finished background write (without waiting for one in progress)."""
        if self._error is not None and not self.busy:
            error, self._error = self._error, None
            raise CheckpointWriteError(
                f"the checkpoint of step {self._step} ({step_dir_name(self._step)}) could not be written in the "
                f"background (checkpoint.asynchronous=true): {type(error).__name__}: {error}") from error


def gather_manifests(manifest: dict, world_size: int, group=None) -> dict:
    """Every rank's file manifest merged (rank 0's entry wins a name two ranks wrote)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return manifest

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, manifest, group=group)
    merged: dict = {}
    for rank_manifest in reversed(gathered):
        merged.update(rank_manifest)
    return merged
