"""The driver's side of a handoff: rank 0's records, sent by the driver's own RunLogger.

    relay = Relay(uri, run_id, spool_dir_for(run_dir))   # after the driver opened the run
    ...                                                  # trainer.fit(): rank 0 logs with
                                                         # RunLogger(..., handoff=True)
    relay.close()                                        # before end_run

Rank 0 writes each batch of records as one file under `<spool_dir>/<run_id>/handoff/`
(gentrain.tracking.spool.write_handoff). Every `interval` s a thread here forwards the
files, oldest first, into one RunLogger of this process, waits until that logger has sent
or spooled them, and only then deletes them. So MLflow is imported once, by the driver
(which has the run open already), instead of again in rank 0 on the way to its first step;
and the logger, with its repeat rule, outlives a worker restart. Sending, retrying and
spooling while the server is away are RunLogger's, as before. A driver killed midway leaves
the files: the next driver of the run forwards them (MLflow keeps a metric's first value at
a step), and `gentrain sync` moves them into the spool (spool.absorb_handoff).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from gentrain.tracking.logger import RunLogger
from gentrain.tracking.spool import HANDOFF_DIR, _Spool, handoff_files

_log = logging.getLogger("gentrain.tracking")


class Relay:
    def __init__(self, uri: str, run_id: str, spool_dir: str, interval: float = 1.0):
        self.folder = Path(spool_dir) / run_id / HANDOFF_DIR
        self.interval = interval
        self.logger = RunLogger(uri, run_id, spool_dir=spool_dir)
        self._taken: set[Path] = set()  # forwarded, not yet sent or spooled: never forwarded twice
        self._waiting: list[tuple[threading.Event, list[Path]]] = []
        self._warned = False
        self._lock = threading.Lock()  # forward() runs in the thread and in close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"mlflow-relay-{run_id[:8]}")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.forward()

    def forward(self, timeout: float = 60.0) -> int:
        """Forward the files waiting now and wait up to `timeout` s until the logger has sent
        or spooled them; the number of records forwarded. A file is deleted only then."""
        with self._lock:
            return self._forward(timeout)

    def _forward(self, timeout: float) -> int:
        try:
            files = [path for path in handoff_files(self.folder) if path not in self._taken]
            records = [record for path in files for record in _Spool(path).read()]
            done = threading.Event()
            if records:
                self.logger.forward(records)
                if not self.logger.mark(done):
                    return 0  # closed: the files stay for `gentrain sync`
            else:
                done.set()  # empty files (a crash mid-write leaves none: they appear whole)
            self._taken.update(files)
            self._waiting.append((done, files))
            done.wait(timeout)
            self._settle()
            return len(records)
        except Exception as error:  # noqa: BLE001 - tracking never takes the run down
            if not self._warned:
                self._warned = True
                _log.warning("MLflow relay: could not forward rank 0's records from %s: %s",
                             self.folder, error)
            return 0

    def _settle(self) -> None:
        for entry in list(self._waiting):
            done, files = entry
            if done.is_set():
                for path in files:
                    # Read-only now: it stays (and stays taken: not forwarded twice by this
                    # driver); the run's next driver forwards it again, and MLflow keeps a
                    # metric's first value at a step.
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                        self._taken.discard(path)
                self._waiting.remove(entry)

    def close(self, timeout: float = 30.0) -> bool:
        """Forward what is left, then close the logger (spooling what it could not send);
        True when everything was sent."""
        self._stop.set()
        self._thread.join(timeout)
        self.forward(timeout)
        sent = bool(self.logger.close(timeout))
        self._settle()  # the logger sent or spooled what it had: those files go
        return sent
