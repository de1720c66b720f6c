"""The end of a run's record: bounded when MLflow is away, finished later by `gentrain sync`.

    ending = end_run(uri, run_id, "FINISHED", spool_dir_for(run_dir))   # the driver, seconds
    if not ending.marked:
        print(f"send them: gentrain sync {run_dir}")
    sync_run(uri, run_id, spool_dir)        # later: the spool, then the recorded status

The final status is written to the run's spool folder before it is sent, so a server that
is down (or a driver killed right then) leaves it there for `sync_run`; a run is never
left RUNNING once the server is reachable and the sync has run.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from gentrain.tracking.logger import _Sender, fail_fast_http
from gentrain.tracking.logger import short_reason as _reason
from gentrain.tracking.spool import (
    MODEL_FILE, PENDING_FILE, STAGED_DIR, _Spool, absorb_handoff, clear_final_status, pending_count, read_final_status,
    read_model, record_final_status,
)

_log = logging.getLogger("gentrain.tracking")


@dataclass
class Ending:
    """What reached MLflow: `marked` when its final status (if any) and every spooled record
    did; otherwise `unsent` points and `folder` holds them, `error` says why."""
    run_id: str
    status: str | None
    marked: bool
    sent: int = 0
    unsent: int = 0
    folder: Path | None = None
    error: str | None = None


def end_run(uri: str, run_id: str, status: str, spool_dir: str | None) -> Ending:
    """Mark the run `status` and send what its workers left spooled, in seconds whatever
    the server's state; never raises. What could not be sent stays in the spool folder."""
    fail_fast_http()
    if spool_dir is None:  # remote storage: no folder of ours to keep the status in
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
            return Ending(run_id, status, marked=True)
        except Exception as error:  # noqa: BLE001 - any client failure: the run stays as it is
            return Ending(run_id, status, marked=False, error=_reason(error))
    folder = Path(spool_dir) / run_id
    try:
        record_final_status(folder, status, uri)
        problem = None
    except OSError as error:  # a full or read-only disk: the status is still set below
        problem = error
    ending = sync_run(uri, run_id, spool_dir, status=status)
    if problem is not None and not ending.marked:
        _log.warning("could not record the final status in %s: %s", folder, problem)
    return ending


def sync_run(uri: str, run_id: str, spool_dir: str | Path, status: str | None = None) -> Ending:
    """Send `<spool_dir>/<run_id>`'s records, then set the final status recorded there
    (`status`, where given: the one the caller could not record). Idempotent: what was
    sent leaves the folder, a second call finds nothing to do."""
    fail_fast_http()
    folder = Path(spool_dir) / run_id
    final = read_final_status(folder)
    status = status or (final.get("status") if final else None)
    with contextlib.suppress(OSError):  # what a killed driver had not taken from rank 0
        absorb_handoff(folder)
    sender = _Sender(uri, run_id, None, _Spool(folder / PENDING_FILE, uri))
    before = pending_count(folder)
    try:
        _, error = sender.drain()
    except Exception as unexpected:  # noqa: BLE001 - a torn spool, a full disk: report, keep it
        error = unexpected
    if error is None:
        error = _log_recorded_model(uri, run_id, folder)
    if error is None and status:
        try:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
        except Exception as failure:  # noqa: BLE001
            error = failure
        else:
            with contextlib.suppress(OSError):  # read-only: a later sync sets the same status again
                clear_final_status(folder)
    unsent = pending_count(folder)
    marked = error is None and unsent == 0
    if marked and status:
        # The run has ended and nothing of it waits: a staged copy left now is one whose
        # record a killed worker never wrote (it was lost with the worker), not sendable.
        with contextlib.suppress(OSError):
            shutil.rmtree(folder / STAGED_DIR)
    return Ending(run_id, status, marked=marked, sent=before - unsent, unsent=unsent,
                  folder=None if marked else folder,
                  error=None if error is None else _reason(error))


def _log_recorded_model(uri: str, run_id: str, folder: Path) -> Exception | None:
    """The trained model the driver could not log (spool.record_model), logged now."""
    recorded = read_model(folder)
    if recorded is None:
        return None
    checkpoint = Path(recorded["checkpoint"])
    if (checkpoint / "model.pt").is_file():
        from gentrain.tracking.model import log_model_from_checkpoint

        try:
            log_model_from_checkpoint(uri, run_id, checkpoint, recorded.get("register_as"))
        except Exception as error:  # noqa: BLE001 - reported as the sync's error
            return error
    else:
        _log.warning("run %s: the checkpoint %s whose model was to be logged is gone; not logged",
                     run_id, checkpoint)
    with contextlib.suppress(OSError):
        (folder / MODEL_FILE).unlink()
    return None
