"""One `[gentrain]` line per worker failure, instead of Ray's raw notices.

When a Ray Train worker dies (SIGKILL, the OOM killer, a crash), Ray's raylet publishes
"A worker died or was killed while executing a task by an unexpected system error ..."
(a paragraph with lease, worker and node ids) and Ray Train's controller decides, on its
own, whether to restart the workers. Neither says it in the user's terms. Here:

- `FailureReporter`, a Ray Train callback that runs in the controller, prints one marked
  line per failure that restarts the workers (the rank, the pid, what happened, counted
  against `checkpoint.max_failures`; with no restart left it prints nothing: the driver's
  error, the run's last line, says it); the workers' `resumed from step N
  (<folder>)` line that follows names the checkpoint they chose (gentrain.checkpoint).
  This line does not guess it: when it prints, a surviving rank may still be copying a
  folder into storage, so only the restarted workers know which folder is newest and good;
- `launch.console` keeps the raylet's notice off the console (it stays in Ray's logs:
  `logs/events/event_RAYLET.log` of the session).

    [gentrain] worker 1 (pid 6553) died (killed by a signal such as SIGKILL, by the OOM killer, or crashed); restarting the workers from the newest good checkpoint (failure 1 of 3 allowed by checkpoint.max_failures)
    [gentrain] resumed from step 8 (runs/vae-debug/step-00000008)
"""

from __future__ import annotations

import re

from ray.train import UserCallback

from gentrain.launch.console import worker_print

_PID = re.compile(r"\bpid[:=] ?(\d+)")


def describe(rank: int, error: BaseException) -> str:
    """`worker R (pid P) died (...)` or `worker R failed (Type: first line)`."""
    text = str(error)
    pid = _PID.search(text)
    who = f"worker {rank}" + (f" (pid {pid.group(1)})" if pid else "")
    if _died(error):
        return f"{who} died (killed by a signal such as SIGKILL, by the OOM killer, or crashed)"
    cause = _cause(error)
    first = (str(cause).strip().splitlines() or [""])[0][:200]
    return f"{who} failed ({type(cause).__name__}: {first})"


def _died(error: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(_cause(error), RayActorError)


def _cause(error: BaseException) -> BaseException:
    """The worker's own error under Ray Train's wrappers (a health check, a user error)."""
    for attribute in ("health_check_failure", "cause"):
        inner = getattr(error, attribute, None)
        if isinstance(inner, BaseException):
            return _cause(inner)
    return error


class FailureReporter(UserCallback):
    """Runs in Ray Train's controller: one line per worker-group restart. Counts the way
    Ray Train's default failure policy does (every worker-group failure; a preemption is
    not charged, and no preemption happens on the embedded one-node Ray)."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        if not worker_exceptions or any(getattr(_cause(e), "preempted", False)
                                        for e in worker_exceptions.values()):
            return
        self.failures += 1
        # A rank that died first; the others' errors (a broken collective) follow from it.
        ranks = sorted(worker_exceptions, key=lambda rank: (not _died(worker_exceptions[rank]), rank))
        what = describe(ranks[0], worker_exceptions[ranks[0]])
        others = ranks[1:]
        if others:
            what += (f" (worker{'s' if len(others) > 1 else ''} "
                     f"{', '.join(str(rank) for rank in others)} failed with it)")
        limit = "unlimited" if self.max_failures < 0 else self.max_failures
        if self.max_failures < 0 or self.failures <= self.max_failures:
            worker_print(f"{what}; restarting the workers from the newest good checkpoint "
                         f"(failure {self.failures} of {limit} allowed by checkpoint.max_failures)")
        # With no restart left the driver's error says it, as the run's last line. A line from
        # here would reach the console through Ray's log monitor, which polls: it could come
        # after the driver's error.


def death_failure(error: BaseException, max_failures: int, run_dir: str) -> str | None:
    """One paragraph for a run that failed because a worker died and no restart was left
    (Ray Train's error carries every rank's traceback; the others' are the broken
    collective that followed). None when no worker died."""
    failures = getattr(error, "worker_failures", None)
    if not isinstance(failures, dict):
        return None
    dead = sorted(rank for rank, failure in failures.items() if _died(failure))
    if not dead:
        return None
    from gentrain.checkpoint import newest_good_checkpoint

    choice = newest_good_checkpoint(run_dir)
    resume = (f"continue from step {choice.step} ({choice.folder})" if choice.folder
              else "start again from step 0 (no complete checkpoint yet)")
    restarts = ("no restarts allowed (checkpoint.max_failures=0)" if max_failures == 0
                else f"all {max_failures} restarts of checkpoint.max_failures used")
    return (f"{describe(dead[0], failures[dead[0]])}, {restarts}. Run the same command to "
            f"{resume}; raise checkpoint.max_failures to let Ray Train restart the workers "
            "within a run.")


_SHARD_ERROR = re.compile(r"ShardReadError: (.+)")


def data_failure(error: BaseException, max_failures: int, run_dir: str) -> str | None:
    """One paragraph for a run that failed on a shard it cannot read (data.on_error: fail),
    instead of Ray Train's error with the rank's traceback. None for any other failure."""
    from gentrain.data.errors import ShardReadError

    failures = getattr(error, "worker_failures", None)
    if not isinstance(failures, dict):
        return None
    for rank, failure in sorted(failures.items()):
        cause = _cause(failure)
        found = [str(cause)] if isinstance(cause, ShardReadError) else _SHARD_ERROR.findall(str(failure))
        if not found:
            continue
        from gentrain.checkpoint import newest_good_checkpoint

        choice = newest_good_checkpoint(run_dir)
        resume = (f"continue from step {choice.step} ({choice.folder})" if choice.folder
                  else "start from step 0 (no complete checkpoint was written)")
        retried = (f" Ray Train restarted the workers {max_failures} times (checkpoint.max_failures): "
                   "a shard that cannot be read fails the same way each time." if max_failures else "")
        return f"worker {rank}: {found[-1].strip()}; then run the same command to {resume}.{retried}"
    return None
