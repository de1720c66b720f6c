"""RunLogger: rank 0's non-blocking, never-raising handle on an MLflow run.

Calls only enqueue. A background thread (_Sender) batches and sends, retries with backoff
while the server is away and meanwhile spools to disk (_Spool); a later RunLogger for the
same run sends what was spooled first. Import it as `from gentrain.tracking import RunLogger`.

With `handoff=True` (rank 0 of a run whose driver shares its run folder: the embedded Ray)
the thread (_Handoff) writes each batch to a file of the run's spool folder instead, and
the driver's Relay (gentrain.tracking.relay) sends them through the driver's own logger:
MLflow is imported once, by the driver, which has the run open already. This module
imports MLflow only where it sends.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import posixpath
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gentrain.tracking._limits import _KEY_LIMIT, _METRICS_PER_BATCH, _TAG_VALUE_LIMIT
from gentrain.tracking.spool import HANDOFF_DIR, PENDING_FILE, STAGED_DIR, _Spool, _units, write_handoff

# The package's logger, as before the split: records keep the name "gentrain.tracking".
_log = logging.getLogger("gentrain.tracking")

# MLflow's own client retries a dead server for about 4 minutes before raising. RunLogger
# has its own retry loop and spool, so one attempt should fail in seconds.
_FAST_FAIL_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # set_terminated on an http:// server prints "🏃 View run ... 🧪 View experiment ..." to
    # stdout; gentrain's summary says where the run is ("view it").
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_RETRY_MIN_S, _RETRY_MAX_S = 1.0, 30.0


def fail_fast_http() -> None:
    """One MLflow HTTP call fails in seconds, not minutes, in this process (and the Ray
    workers it starts after this): where the user has not chosen other values."""
    for name, value in _FAST_FAIL_HTTP_ENV.items():
        os.environ.setdefault(name, value)
# How long the sender waits for more calls, so one request carries many steps' metrics.
_LINGER_S = 0.5
# MLflow's rule for metric names; checked at the call so that one bad name is dropped
# there with a clear warning instead of getting its whole batch rejected by the server.
_METRIC_NAME = re.compile(r"[/\w.\- :]+")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def short_reason(error: BaseException) -> str:
    """A client error in a few words ("connection refused"): urllib3's text repeats the
    URL and the retry state, and cut to a line it ends mid-sentence."""
    text = str(error)
    for marker, reason in (("NewConnectionError", "connection refused"),
                           ("ConnectTimeout", "connecting timed out"),
                           ("ReadTimeout", "no answer in time"),
                           ("Max retries exceeded", "no answer")):
        if marker in text:
            return reason
    return _first_line(error)[:160]


def _is_rejection(error: Exception) -> bool:
    """The server answered and refused these data: retrying would never succeed."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        # 401/403 are a credentials problem to fix while the spool keeps the data;
        # 408/429 say "later".
        return 400 <= status < 500 and status not in (401, 403, 408, 429)
    return False


@dataclass
class _Flush:
    """Queue marker: set `done` once everything enqueued before it is sent or spooled."""
    done: threading.Event
    stop: bool = False


class _Sender:
    """The background thread's side: batch, send, spool while the server is away, replay."""

    def __init__(self, uri: str, run_id: str, inbox: queue.SimpleQueue, spool: _Spool):
        self.uri, self.run_id, self.inbox, self.spool = uri, run_id, inbox, spool
        self.client = None  # an MlflowClient from the first contact
        self.offline = False
        self.backoff_s = _RETRY_MIN_S
        self.next_retry = 0.0  # a spool left by an earlier logger is replayed at once
        # The run's highest step per metric in MLflow, read at the first contact: the
        # repeat rule (RunLogger's docstring) keeps each metric's steps strictly increasing.
        self.highest_step: dict[str, int] | None = None
        self.repeats_dropped = 0

    def run(self) -> None:
        self._first_contact()
        while True:
            records, flushes = self._take()
            stop = any(flush.stop for flush in flushes)
            try:
                if stop:
                    # On disk first: if the process exits before the send, nothing is lost.
                    # A disk that is full (or read-only) must not cost the records a
                    # reachable server would take: they are sent as they are instead.
                    try:
                        self.spool.append(records)
                        records = []
                    except OSError as exc:
                        _log.info("MLflow logging for run %s: could not spool %d records (%s); "
                                  "sending them directly", self.run_id, len(records), exc)
                self._deliver(records, force=bool(flushes))
            except Exception:
                _log.warning("MLflow logging for run %s dropped %d records", self.run_id,
                             len(records), exc_info=True)
                # Whatever broke (a full disk?) may break again: do not spin on it.
                self.next_retry = time.monotonic() + _RETRY_MAX_S
            for flush in flushes:
                flush.done.set()
            if stop:
                return

    def _take(self) -> tuple[list[dict], list[_Flush]]:
        wait = max(0.0, self.next_retry - time.monotonic()) if self.spool.exists() else None
        return _take(self.inbox, wait)

    def unsent(self) -> bool:
        """Records of this run wait on disk."""
        return self.spool.exists()

    @property
    def where(self) -> Path:
        return self.spool.path

    def _deliver(self, records: list[dict], force: bool) -> None:
        if self.spool.exists():
            # Older records wait on disk: nothing new may overtake them.
            self.spool.append(records)
            if force or time.monotonic() >= self.next_retry:
                self._replay()
            return
        sent, error = self._send(records)
        if error is not None:
            self.spool.append(records[sent:])
            self._went_away(error)

    def drain(self) -> tuple[int, Exception | None]:
        """Send the spool now, in this thread: (records sent, the error that stopped it)."""
        if not self.spool.exists():
            return 0, None
        pending = self.spool.read()
        sent, error = self._send(pending)
        self.spool.rewrite(pending[sent:])
        return sent, error

    def _replay(self) -> None:
        sent, error = self.drain()
        if error is not None:
            self._went_away(error)
            return
        if sent and self.offline:
            # Only the end of an outage that was announced. The last records of every run
            # go through the spool too (close() writes them to disk first): no news.
            _log.warning("MLflow at %s reachable again: sent %d spooled records for run %s",
                         self.uri, sent, self.run_id)
        self.offline, self.backoff_s = False, _RETRY_MIN_S

    def _went_away(self, error: Exception) -> None:
        if not self.offline:
            _log.warning("MLflow at %s unreachable (%s); training goes on, logs for run %s are "
                         "spooled to %s and retried in the background", self.uri,
                         short_reason(error), self.run_id, self.spool.path)
        self.offline = True
        self.next_retry = time.monotonic() + self.backoff_s
        self.backoff_s = min(2 * self.backoff_s, _RETRY_MAX_S)

    def _send(self, records: list[dict]) -> tuple[int, Exception | None]:
        """Send in order; (records done, the transient error that stopped it, if any)."""
        done = 0
        for consumed, unit in _units(records):
            if unit["op"] in ("artifact", "model") and not os.path.exists(unit["local"]):
                # A staged copy goes only once sent (or rejected): this is a resend of a
                # record that reached MLflow before a driver was killed (a handoff file
                # forwarded again, gentrain.tracking.relay), not a loss.
                _log.debug("run %s: %s already sent (its staged copy %s is gone)", self.run_id,
                           unit["op"], unit["local"])
                done = consumed
                continue
            try:
                self._send_unit(unit)
            except Exception as error:
                if not _is_rejection(error):
                    return done, error
                _log.warning("MLflow at %s rejected %s for run %s, dropped: %s", self.uri,
                             unit["op"], self.run_id, _first_line(error))
            if unit["op"] in ("artifact", "model"):
                shutil.rmtree(Path(unit["local"]).parent, ignore_errors=True)
            done = consumed
        return done, None

    def _first_contact(self) -> None:
        """Made as the logger starts (the worker is still building its networks and Ray
        Train's process group), not at the first send: opening the store and reading the
        run cost about 0.7 s of CPU, which at the first send took the training thread's
        time (the GIL) in the first steps. A failure is left to the first send, which
        spools and retries as it always does."""
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            self._read_highest_steps()
        except Exception:  # noqa: BLE001 - unreachable now: the sends find out and spool
            self.highest_step = None

    def _read_highest_steps(self) -> None:
        logged = self.client.get_run(self.run_id).data.to_proto().metrics
        # MLflow's latest value of a metric is the one at its highest step.
        self.highest_step = {metric.key: metric.step for metric in logged}

    def _send_unit(self, unit: dict) -> None:
        if self.client is None:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
        if unit["op"] == "metrics":
            self._send_metrics(unit["items"])
        elif unit["op"] == "tag":
            self.client.set_tag(self.run_id, unit["key"], unit["value"])
        elif unit["op"] == "model":
            from gentrain.tracking.model import log_model_from_checkpoint

            log_model_from_checkpoint(self.uri, self.run_id, unit["local"])
        else:
            self.client.log_artifact(self.run_id, unit["local"], unit["artifact_path"])


    def _send_metrics(self, items: list[list]) -> None:
        from mlflow.entities import Metric

        if self.highest_step is None:
            self._read_highest_steps()
        highest = dict(self.highest_step)
        metrics = []
        for key, value, timestamp, step in items:
            if step <= highest.get(key, -1):
                continue  # logged before a restart (or a resend): the first value stays
            highest[key] = step
            metrics.append(Metric(key, value, timestamp, step))
        if len(metrics) < len(items):
            self._note_repeats(len(items) - len(metrics))
        for start in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _METRICS_PER_BATCH])
        self.highest_step = highest

    def _note_repeats(self, count: int) -> None:
        if not self.repeats_dropped:
            _log.info("run %s: points at steps MLflow already has (logged before a restart) "
                      "are not logged again", self.run_id)
        self.repeats_dropped += count


def _take(inbox: queue.SimpleQueue, wait: float | None) -> tuple[list[dict], list[_Flush]]:
    """The next batch: what comes within _LINGER_S of the first item (waited for up to
    `wait` s; None: until one comes), up to and with the first flush marker."""
    try:
        taken = [inbox.get(timeout=wait)]
    except queue.Empty:
        return [], []
    deadline = time.monotonic() + _LINGER_S
    while not isinstance(taken[-1], _Flush):
        try:
            taken.append(inbox.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    return ([item for item in taken if isinstance(item, dict)],
            [item for item in taken if isinstance(item, _Flush)])


class _Handoff:
    """The background thread of a handoff RunLogger: each batch becomes one file in
    `<spool>/<run_id>/handoff/`, written whole (a reader never sees half of one), for the
    driver's Relay to send. No MLflow here, unless the folder cannot be written (a full or
    read-only disk): rank 0 then sends itself from that batch on, as without handoff."""

    def __init__(self, uri: str, run_id: str, inbox: queue.SimpleQueue, folder: Path, spool: _Spool):
        self.uri, self.run_id, self.inbox, self.folder, self.spool = uri, run_id, inbox, folder, spool
        self.direct: _Sender | None = None

    @property
    def where(self) -> Path:  # what close() names when the thread does not finish in time
        return self.spool.path if self.direct else self.folder

    def run(self) -> None:
        while True:
            records, flushes = _take(self.inbox, None)
            try:
                self._hand_over(records, force=bool(flushes))
            except Exception as error:  # noqa: BLE001 - tracking never takes the run down
                _log.warning("MLflow logging for run %s dropped %d records: %s", self.run_id,
                             len(records), _first_line(error))
            for flush in flushes:
                flush.done.set()
            if any(flush.stop for flush in flushes):
                return

    def _hand_over(self, records: list[dict], force: bool) -> None:
        if self.direct is None:
            try:
                write_handoff(self.folder, records)
                return
            except OSError as error:
                _log.info("MLflow logging for run %s: cannot hand records to the driver in %s (%s); "
                          "rank 0 sends them itself from now on", self.run_id, self.folder, error)
                self.direct = _Sender(self.uri, self.run_id, self.inbox, self.spool)
        self.direct._deliver(records, force=force)

    def unsent(self) -> bool:
        # Handed over: sending is the driver's; sent directly: as a _Sender's.
        return self.direct.unsent() if self.direct else False


def _never_raises(method):
    @functools.wraps(method)
    def guarded(self: RunLogger, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            # Tracking must never take training down: say so once per method, with the cause.
            self._warn_once(method.__name__, "RunLogger.%s failed; training goes on without it",
                            method.__name__, exc_info=True)
            return None
    return guarded


class RunLogger:
    """Rank 0's handle on the run. Calls return at once and never raise.

    Logging is queued to a background thread that sends in batches, retries with backoff
    while the server is away, and meanwhile spools to `<spool_dir>/<run_id>/pending.jsonl`;
    a later RunLogger for the same run (after a restart) sends what is there first. The
    default spool_dir is in the temp folder: pass one that survives the restart. Keep one
    RunLogger per run at a time. Artifacts are copied when logged, so the caller may
    overwrite the file at once. Non-finite or non-numeric metric values, and invalid
    names, are dropped with one warning per metric name. A batch whose reply was lost
    in an outage is sent again with the same timestamps; MLflow's SQL store keeps one copy.

    The repeat rule: a metric's point is sent only at a step above the highest step the
    run already has for that metric (MLflow's record, read at the first contact, plus
    what this logger sent). A restarted attempt, which retrains the steps between its
    checkpoint and the failure, adds nothing for those steps: the first value logged at
    a step stays and every metric's steps strictly increase.
    """

    def __init__(self, uri: str, run_id: str, spool_dir: str | os.PathLike | None = None,
                 handoff: bool = False):
        fail_fast_http()
        self.uri, self.run_id = uri, run_id
        root = Path(spool_dir) if spool_dir is not None else (
            Path(tempfile.gettempdir()) / "gentrain-mlflow-spool")
        self._run_dir = root / run_id
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        if handoff:  # the driver sends (its Relay reads <spool>/<run_id>/handoff/)
            self._sender = _Handoff(uri, run_id, self._inbox, self._run_dir / HANDOFF_DIR,
                                    _Spool(self._run_dir / PENDING_FILE, uri))
        else:
            self._sender = _Sender(uri, run_id, self._inbox, _Spool(self._run_dir / PENDING_FILE, uri))
        self._thread = threading.Thread(target=self._sender.run, daemon=True,
                                        name=f"mlflow-run-{run_id[:8]}")
        self._closed = False
        self._warned: set[str] = set()
        self._thread.start()
        atexit.register(self._close_at_exit)

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._accepting("log_metrics"):
            return
        timestamp_ms, step = int(time.time() * 1000), int(step)
        items = []
        for key, value in metrics.items():
            number = self._checked_metric(str(key), value, step)
            if number is not None:
                items.append([str(key), number, timestamp_ms, step])
        if items:
            self._inbox.put({"op": "metrics", "items": items})

    def _checked_metric(self, key: str, value: Any, step: int) -> float | None:
        problem = None
        try:
            number = float(value)
            if not math.isfinite(number):
                problem = f"is {number} at step {step}"
        except (TypeError, ValueError):
            problem = f"is not a number ({type(value).__name__}) at step {step}"
        if (not _METRIC_NAME.fullmatch(key) or len(key) > _KEY_LIMIT
                or posixpath.normpath(key) != key or key.startswith(("/", ".."))):
            problem = ("is not a valid MLflow name (letters, digits, _ - . : / and spaces; "
                       f"a relative path of at most {_KEY_LIMIT} characters)")
        if problem is None:
            return number
        self._warn_once(f"metric:{key}", "metric %r %s: dropped (said once per metric)",
                        key, problem)
        return None

    @_never_raises
    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self._accepting("log_artifact"):
            return
        source = Path(local_path)
        if not source.exists():
            self._warn_once(f"artifact:{source}", "log_artifact: %s does not exist; skipped",
                            source)
            return
        staged = self._staging_dir() / source.name
        if source.is_dir():
            shutil.copytree(source, staged)
        else:
            shutil.copy2(source, staged)
        self._inbox.put({"op": "artifact", "local": str(staged), "artifact_path": artifact_path})

    @_never_raises
    def log_checkpoint_model(self, checkpoint: str | os.PathLike) -> None:
        """The checkpoint folder's weights and spec (model.pt, gentrain.json: copied now, the
        folder may go) logged as an MLflow model of the run at its step, in the background
        like everything else (`tracking.log_model_checkpoints`)."""
        if not self._accepting("log_checkpoint_model"):
            return
        from gentrain.tracking.model import model_folder

        staged = model_folder(checkpoint, self._staging_dir() / "checkpoint")
        self._inbox.put({"op": "model", "local": str(staged)})

    @_never_raises
    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._accepting("log_text"):
            return
        target = PurePosixPath(artifact_file)
        staged = self._staging_dir() / target.name
        staged.write_text(text, encoding="utf-8")
        folder = str(target.parent)
        self._inbox.put({"op": "artifact", "local": str(staged),
                         "artifact_path": None if folder in ("", ".") else folder})

    @_never_raises
    def set_tag(self, key: str, value: Any) -> None:
        if self._accepting("set_tag"):
            self._inbox.put({"op": "tag", "key": str(key), "value": str(value)[:_TAG_VALUE_LIMIT]})

    def forward(self, records: list[dict]) -> None:
        """Records another logger checked and staged (a Relay's: rank 0's), sent in order
        with this logger's own."""
        if self._accepting("forward"):
            for record in records:
                self._inbox.put(record)

    def mark(self, done: threading.Event) -> bool:
        """Set `done` once everything logged before this call is sent or spooled; False (and
        `done` never set) when the logger is closed."""
        if self._closed or not self._thread.is_alive():
            return False
        self._inbox.put(_Flush(done))
        return True

    @_never_raises
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to `timeout` s for what was logged so far; True when all of it was sent
        (handoff: handed to the driver)."""
        if not self._closed and self._thread.is_alive():
            done = threading.Event()
            self._inbox.put(_Flush(done))
            if not done.wait(timeout):
                return False
        return not self._sender.unsent()

    @_never_raises
    def close(self, timeout: float = 30.0) -> bool:
        """Send what is left (spooled to disk first) and stop; True when all of it was sent."""
        if not self._closed:
            self._closed = True
            atexit.unregister(self._close_at_exit)
            self._inbox.put(_Flush(threading.Event(), stop=True))
            self._thread.join(timeout)
        if self._thread.is_alive():
            _log.warning("MLflow at %s still busy after %ss; unsent logs for run %s stay in %s "
                         "for the next RunLogger", self.uri, timeout, self.run_id,
                         self._sender.where)
            return False
        return not self._sender.unsent()

    def _close_at_exit(self) -> None:
        # Unsent records are on disk before the last send, so exit need not wait long.
        self.close(timeout=5.0)

    def _staging_dir(self) -> Path:
        folder = self._run_dir / STAGED_DIR / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def _accepting(self, method: str) -> bool:
        if self._closed:
            self._warn_once("closed", "RunLogger for run %s is closed; %s dropped",
                            self.run_id, method)
        return not self._closed

    def _warn_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message, *args, exc_info=exc_info)
