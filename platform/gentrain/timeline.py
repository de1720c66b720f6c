"""Wall-clock marks of a run's start-up and steps, for `gentrain bench e2e`.

    GENTRAIN_TIMELINE=/tmp/run.jsonl gentrain run vae/debug

With the variable set, the driver and rank 0 append one JSON line per mark
({"event", "time" (time.time()), "cpu" (time.process_time()), "pid", ...}) to that file: where the seconds before
the first step go (Ray start, imports, dataset open, model build, strategy setup,
first batch) and when each progress step ended. Unset (the default) a mark costs one
environment lookup; marks are only made at start-up and at train.log_every steps.
Ray's workers inherit the variable from the driver that starts the embedded Ray.
"""

from __future__ import annotations

import json
import os
import time

TIMELINE_ENV = "GENTRAIN_TIMELINE"


def mark(event: str, **fields) -> None:
    """Append `event` with the current wall-clock time (a no-op unless GENTRAIN_TIMELINE is set)."""
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    # cpu: the process's CPU seconds (all its threads): a measure of cost that the
    # machine's load moves far less than wall time.
    record = {"event": event, "time": time.time(), "cpu": time.process_time(), "pid": os.getpid(), **fields}
    # One short line in append mode: lines from several processes do not interleave.
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def read(path: str) -> list[dict]:
    """The marks of a timeline file, in the order written."""
    try:
        with open(path, encoding="utf-8") as source:
            return [json.loads(line) for line in source if line.strip()]
    except FileNotFoundError:
        return []
