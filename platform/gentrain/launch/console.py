"""What the user of `gentrain run` reads: gentrain's own lines, clean; Ray's chatter kept.

Ray streams every worker's and actor's stdout/stderr to the driver, each line prefixed
`(RayTrainWorker pid=...)` in ANSI colour. `WorkerConsole` takes Ray's place as that
stream's printer (Ray's own handler is removed, so nothing prints twice):

- lines a worker writes with the `[gentrain] ` mark are printed as written, without
  prefix or colour; progress lines (`[gentrain] step ...`) redraw in place on a terminal
  and stay plain lines in a file or CI;
- everything else (Ray Train's controller, `ray.train.report`, the placement-group
  cleaner, ...) is kept in a short buffer: when the run fails, the folder of Ray's logs
  is printed, with the buffer's last lines unless the error already carries the
  workers' tracebacks (Ray Train's TrainingFailedError does). Ray's log files hold all of
  it either way.

A worker's death is one line of gentrain's (`launch.failures`): the raylet's own notice
("A worker died or was killed while executing a task by an unexpected system error ...",
which Ray prints to the driver's stdout itself, not through the log stream) is kept in the
buffer instead of printed; Ray's `logs/events/event_RAYLET.log` has it too.

Workers print through `worker_print` and route the `gentrain` logger through
`route_worker_logs`, so their warnings (an MLflow outage) carry the mark too.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading

MARK = "[gentrain] "
PROGRESS = MARK + "step "
_HANDLER_NAME = "ray_print_logs"  # the name ray._private.worker gives its printer
_GENTRAIN_HANDLER = "gentrain_console"
WORKER_DEATH_NOTICE = "A worker died or was killed while executing a task"  # the raylet's


def worker_print(message: str, stream=None) -> None:
    """One marked line from a worker. Not print(): Ray Train patches it in workers and
    tees it (lines twice)."""
    stream = stream or sys.stdout
    stream.write(f"{MARK}{message}\n")
    stream.flush()


def route_worker_logs() -> None:
    """The `gentrain` logger's warnings as marked lines on the worker's stderr."""
    logger = logging.getLogger("gentrain")
    if any(getattr(handler, "gentrain_console", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MarkedFormatter())
    handler.gentrain_console = True
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False  # Ray's root handler would print it a second time, unmarked


class _MarkedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{MARK}{record.levelname.lower()}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


class WorkerConsole:
    """Prints the marked lines of Ray's worker log stream; keeps the rest for a failure."""

    def __init__(self, out=None, err=None, keep: int = 200, redraw: bool | None = None):
        self._out, self._err = out, err  # None: sys.stdout/sys.stderr as they are at each write
        self.recent: collections.deque[str] = collections.deque(maxlen=keep)
        self.redraw = _is_terminal(self.out) if redraw is None else redraw
        self._open_progress = False  # a redrawn progress line is on screen, not yet ended
        self._lock = threading.Lock()

    @property
    def out(self):
        return self._out or sys.stdout

    @property
    def err(self):
        return self._err or sys.stderr

    def handle(self, data: dict) -> None:
        """Ray's log-stream callback: one batch of lines of one process."""
        if data.get("pid") == "autoscaler":
            return  # the autoscaler's status tables; its own log keeps them
        source = data.get("actor_name") or data.get("task_name") or "ray"
        with self._lock:
            for line in data.get("lines", ()):
                if line.startswith(MARK):
                    self._show(line, data.get("is_err", False))
                elif line.strip():
                    self.recent.append(f"({source} pid={data.get('pid')}) {line}")

    def _show(self, line: str, is_err: bool) -> None:
        if self.redraw and line.startswith(PROGRESS) and not is_err:
            self.out.write("\r\x1b[2K" + line)  # redraw: clear the line, no newline yet
            self._open_progress = True
        else:
            self.end_progress()
            stream = self.err if is_err else self.out
            stream.write(line + "\n")
        self.out.flush()

    def end_progress(self) -> None:
        if self._open_progress:
            self.out.write("\n")
            self._open_progress = False

    def report_failure(self, log_dir: str | None, lines: int = 30) -> None:
        """After a failed run: Ray's last `lines` lines and where the rest is."""
        with self._lock:
            self.end_progress()
            last = list(self.recent)[-lines:] if lines > 0 else []
            if last:
                self.err.write("Ray's last lines before the failure:\n")
                self.err.writelines(f"  {line}\n" for line in last)
            if log_dir:
                self.err.write(f"Ray's logs (every worker and actor): {log_dir}\n")
            self.err.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("CI")
    except (AttributeError, ValueError):
        return False


_console: WorkerConsole | None = None


def install() -> WorkerConsole | None:
    """Replace Ray's printer of the worker log stream by a WorkerConsole (after ray.init).

    Uses Ray's stream dispatcher (ray._private, Ray pinned in pyproject.toml): when it is
    not there, Ray's own printer stays and the output is noisy but complete."""
    global _console
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    names = [name for name, _ in getattr(dispatcher, "handlers", ())]
    if _HANDLER_NAME not in names:
        # Already replaced for this Ray (runs in one process share it), or log_to_driver=False.
        return _console if _GENTRAIN_HANDLER in names else None
    _console = WorkerConsole()
    _divert_death_notices()
    dispatcher.remove_handler(_HANDLER_NAME)
    dispatcher.remove_handler(_GENTRAIN_HANDLER)  # one left from a Ray shut down earlier
    dispatcher.add_handler(_GENTRAIN_HANDLER, _console.handle)
    return _console


def _divert_death_notices() -> None:
    """Ray's driver prints the raylet's error notices with `ray._private.worker.
    print_to_stdstream`, looked up at each call: wrap it so a worker-death notice goes to
    the console's buffer (launch.failures prints gentrain's line) and any other notice
    prints as before."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "gentrain", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        lines = data.get("lines", ())
        if (_console is not None and data.get("pid") == "raylet"
                and any(WORKER_DEATH_NOTICE in line for line in lines)):
            _console.handle(data)  # not a marked line: kept in the buffer only
            return
        original(data, ignore_prefix)

    print_to_stdstream.gentrain = True
    ray_worker.print_to_stdstream = print_to_stdstream


def current() -> WorkerConsole | None:
    return _console
