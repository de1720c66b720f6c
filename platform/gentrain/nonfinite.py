"""Non-finite losses and gradients, found before the optimizer update, alike on every rank.

    gentrain run vae/debug train.optimizer.lr=1e30              # stops at the first bad step
    gentrain run vae/debug train.nonfinite=skip                 # skips it, counts it, goes on
    gentrain run vae/debug train.nonfinite=rollback             # back to the last good checkpoint, lower lr

Each strategy's `step(name)` asks its `NonFiniteGuard` before it updates `name`: the
losses `backward` saw for `name` since the last update and this rank's gradients (its
partitions under ZeRO) give two flags, all-reduced, so every rank takes the same branch
(a rank-local decision would leave the others waiting in DDP's or ZeRO's collectives).
Replicated strategies (DDP, Accelerate's DDP; not under fp16) need no collective of their
own on a good step: the loss to backpropagate gets `flag * s` added, where `s` is one
element of the network's smallest trainable parameter (its sentinel) and the flag is 0
for a finite loss (the sum and its gradients are then exactly what they were) and NaN
otherwise. A bad loss on any rank so makes that gradient NaN, DDP's all-reduce carries it
to every rank, and the all-reduced gradient norm, the same bits on every rank, decides
alike everywhere. Only a step found bad pays one all-reduce, to tell a loss from a
gradient; the sentinel is then left out of the parameter the message names.
Under fp16 the gradients are the loss scaler's business (an overflow skips the step and
lowers the scale, under DDP, Accelerate and DeepSpeed alike): only the loss is checked.
A step that is not made (any policy) has its gradients dropped by the strategy: DDP and
Accelerate zero them; DeepSpeed runs its own fp16-overflow branch, which clears its
gradient partitions and leaves Adam and the lr schedule alone (deepspeed._drop_step).

train.nonfinite (the spec's policy):
- stop: `NonFiniteError` naming the step, the network, whether the loss or a gradient
  was not finite, the first such parameter ("decoder.net.3.weight") and advice that
  depends on the spec. The weights are those before that step. A deterministic failure:
  the worker does not raise it to Ray Train (which would retry it up to
  checkpoint.max_failures times, unchanged); every rank ends its loop, rank 0 leaves
  STOP_FILE in the run folder, and the driver raises it (`raise_if_stopped`).
- skip: the step's gradients are dropped and nothing is updated (nor the lr schedule);
  counted as train/nonfinite_skipped; more than train.nonfinite_max_skips in a row stop.
- rollback: the step's gradients are dropped, `StepContext.step` raises NonFiniteRollback
  and the engine (`Engine.roll_back`) restores the newest good checkpoint on every rank,
  multiplies every network's learning rate by train.nonfinite_lr_factor and goes on:
  counted as train/nonfinite_rollbacks; past train.nonfinite_max_rollbacks it stops as
  `stop` does. The retry is not the same run again: its learning rate is lower.

A checkpoint is never written from non-finite weights: `check_weights` runs before every
save, on every rank, and raises NonFiniteError instead.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from gentrain.paths import is_remote

STOP_FILE = "nonfinite-stop.json"  # in the run folder: written by rank 0, read by the driver


class NonFiniteError(FloatingPointError, RuntimeError):
    """A non-finite loss, gradient or weight: the same run would fail the same way again."""


@dataclass(frozen=True)
class Finding:
    network: str
    source: str  # "loss" or "gradient"
    parameter: str | None  # the first parameter (in the network's order) whose gradient is not finite
    consecutive: int = 1  # non-finite updates of this network in a row, this one included


class NonFiniteRollback(NonFiniteError):
    """train.nonfinite=rollback: raised on every rank alike by StepContext.step; the engine
    catches it and rolls back (a worker never lets it reach Ray Train)."""

    def __init__(self, finding: "Finding", done: int):
        super().__init__(f"non-finite values at step {done + 1} in network {finding.network!r}: "
                         f"{_what(finding)}")
        self.finding = finding
        self.done = done  # optimizer steps done before the failing one


class NonFiniteFound(Exception):
    """Raised by a strategy's step; StepContext.step turns it into a NonFiniteError with the step."""

    def __init__(self, finding: Finding):
        super().__init__(finding)
        self.finding = finding


class NonFiniteGuard:
    """One per strategy: records losses at backward, decides at each update."""

    def __init__(self, policy: str = "stop", max_skips: int = 10, check_gradients: bool = True):
        self.policy = policy
        self.max_skips = max_skips
        self.check_gradients = check_gradients  # False under fp16: the loss scaler handles overflow
        # Set by replicated strategies (gradients all-reduced whole, their norm the same on
        # every rank): a bad loss poisons its network's sentinel gradient instead of being
        # all-reduced.
        self.gradients_shared = False
        self._sentinels: dict[str, tuple[str, torch.nn.Parameter] | None] = {}  # network -> (name, parameter)
        self.skipped = 0  # updates skipped in this process: train/nonfinite_skipped
        # per network: a GAN's generator stepping fine must not hide a critic skipped forever
        self._in_a_row: dict[str, int] = {}
        self._loss_bad: dict[str, torch.Tensor] = {}

    def forget_pending(self) -> None:
        """Drop the loss flags of updates that never came (a rollback abandons its step, and a
        network whose backward ran but whose step did not would carry a stale flag)."""
        self._loss_bad.clear()
        self._in_a_row.clear()

    @property
    def _poisons(self) -> bool:
        return self.gradients_shared and self.check_gradients

    def record_loss(self, name: str, loss: torch.Tensor,
                    parameters: Callable[[], Iterable[tuple[str, torch.nn.Parameter]]] | None = None) -> torch.Tensor:
        """Called at every backward, with the loss about to be backpropagated; returns the
        loss to backpropagate: itself, or with the sentinel term (see the module's
        docstring) where the strategy shares whole gradients and `parameters` (the
        network's named parameters) is given. No host sync: the flag stays a tensor."""
        bad = ~torch.isfinite(loss.detach()).all()
        previous = self._loss_bad.get(name)
        self._loss_bad[name] = bad if previous is None else previous | bad
        if not self._poisons or parameters is None:
            return loss
        if name not in self._sentinels:  # found once: a network keeps its parameters
            self._sentinels[name] = _sentinel(parameters())
        sentinel = self._sentinels[name]
        if sentinel is None:
            return loss
        # 0 * s is 0 and x + 0 is x, bit for bit: a good step's loss and gradients are unchanged.
        flag = torch.where(bad, float("nan"), 0.0).to(loss.dtype)
        return loss + flag * sentinel[1].reshape(-1)[0].to(loss.dtype)

    def allows_update(self, name: str, local_gradients_bad: torch.Tensor | bool | None,
                      all_reduce: Callable[[torch.Tensor], torch.Tensor],
                      first_bad_parameter: Callable[[str | None], str | None]) -> bool:
        """True: update `name`. False: skip it (the caller drops the gradients). Raises
        NonFiniteFound under stop, or past max_skips. A collective: every rank calls it."""
        loss_bad = self._loss_bad.pop(name, None)
        gradients_bad = local_gradients_bad if self.check_gradients else None
        if self._poisons and gradients_bad is not None and not bool(gradients_bad):
            # The all-reduced norm is finite on every rank alike, and a bad loss anywhere
            # would have made it NaN everywhere: nothing to agree on.
            self._in_a_row[name] = 0
            return True
        flags = torch.tensor([0.0 if loss_bad is None else float(loss_bad),
                              0.0 if gradients_bad is None else float(gradients_bad)])
        flags = all_reduce(flags)  # a sum: any rank's flag counts on every rank
        if not bool((flags > 0).any()):
            self._in_a_row[name] = 0
            return True
        in_a_row = self._in_a_row[name] = self._in_a_row.get(name, 0) + 1
        source = "loss" if flags[0] > 0 else "gradient"
        # Every rank names the parameter the same way (under ZeRO a collective, in the same
        # order); a bad loss made its sentinel's gradient NaN: that one is not named for it.
        sentinel = self._sentinels.get(name) if source == "loss" and self._poisons else None
        skip = sentinel[0] if sentinel else None
        finding = Finding(name, source, first_bad_parameter(skip), in_a_row)
        if self.policy == "skip" and in_a_row <= self.max_skips:
            self.skipped += 1
            _rank0_print(f"[gentrain] skipped an update of {name}: {_what(finding)} "
                         f"(train.nonfinite=skip; {in_a_row} in a row, at most {self.max_skips})")
            return False
        raise NonFiniteFound(finding)


def first_nonfinite(named_gradients: Iterable[tuple[str, torch.Tensor | None]], skip: str | None = None) -> str | None:
    for name, grad in named_gradients:
        if name != skip and grad is not None and not bool(torch.isfinite(grad).all()):
            return name
    return None


def _sentinel(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> tuple[str, torch.nn.Parameter] | None:
    """The smallest trainable parameter (the first of equal size): its gradient carries the
    loss flag at the least cost (the backward of one element fills a tensor of its size)."""
    trainable = [(p.numel(), i, key, p) for i, (key, p) in enumerate(named_parameters) if p.requires_grad and p.numel()]
    if not trainable:
        return None
    _, _, key, parameter = min(trainable, key=lambda item: item[:2])
    return key, parameter


def any_nonfinite(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """One bool tensor for all `tensors` (no host sync per tensor)."""
    flags = [~torch.isfinite(t.detach()).all() for t in tensors if t is not None]
    return torch.stack(flags).any().cpu() if flags else torch.tensor(False)


# -- the report ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecFacts:
    """What the advice depends on (strategy and train sections)."""

    policy: str
    max_skips: int
    grad_clip: float | None
    precision: str
    lr: float | None  # at the failing step (after warm-up and schedule)
    base_lr: float | None = None  # before the schedule: what train.optimizer.lr sets (after rollbacks)
    max_rollbacks: int = 3
    rollbacks: int = 0  # made so far in this run (rollback)


def _what(finding: Finding) -> str:
    if finding.source == "loss":
        if finding.parameter is None:
            return "its loss is not finite (its gradients are finite)"
        return f"its loss is not finite (and so are its gradients, first {finding.parameter})"
    if finding.parameter is None:
        return "its gradient norm is not finite (every gradient is finite, their norm overflows)"
    return f"the gradient of {finding.parameter} is not finite (the first in parameter order; the loss was finite)"


def stop_message(finding: Finding, done: int, facts: SpecFacts) -> str:
    """The error of train.nonfinite=stop (or of too many skips): what, where, what to change.
    `done`: optimizer steps done before it, so the failing one is step done+1 (as the
    progress lines and step-N checkpoints count)."""
    step = done + 1
    if facts.policy == "rollback":
        head = (f"non-finite values at step {step} in network {finding.network!r}: {_what(finding)}; "
                f"rollbacks exhausted ({facts.rollbacks} made, train.nonfinite_max_rollbacks="
                f"{facts.max_rollbacks})")
    elif finding.consecutive > 1:
        head = (f"non-finite values at step {step} in network {finding.network!r}, {finding.consecutive} "
                f"updates in a row (train.nonfinite_max_skips={facts.max_skips}): {_what(finding)}")
    else:
        head = f"non-finite values at step {step} in network {finding.network!r}: {_what(finding)}"
    advice = []
    base = facts.base_lr if facts.base_lr is not None else facts.lr
    if base is not None:
        now = f"; {facts.lr:g} at this step of the schedule" if facts.lr is not None and facts.lr != base else ""
        after = f" after {facts.rollbacks} rollbacks" if facts.policy == "rollback" and facts.rollbacks else ""
        advice.append(f"lower train.optimizer.lr (now {base:g}{after}{now}), e.g. train.optimizer.lr={base / 10:g}")
    if facts.grad_clip is None:
        advice.append("set train.grad_clip (e.g. 1.0)")
    if facts.precision != "fp32":
        advice.append(f"try strategy.precision=fp32 (now {facts.precision})")
    if facts.policy == "stop":
        advice.append("or skip such steps with train.nonfinite=skip")
    elif facts.policy == "rollback":
        advice.append(f"or allow more rollbacks: train.nonfinite_max_rollbacks (now {facts.max_rollbacks})")
    else:
        advice.append(f"or allow more in a row: train.nonfinite_max_skips (now {facts.max_skips})")
    return (f"{head}. Step {step} made no update: the weights are those after step {done}. "
            f"To fix: {'; '.join(advice)}.")


def rollback_line(error: NonFiniteRollback, restored_step: int, folder: str, lrs: dict[str, float],
                  count: int, max_rollbacks: int, factor: float) -> str:
    """The console line of a rollback: what failed where, which checkpoint, the new lr."""
    rates = ", ".join(f"{lr:g} ({name})" for name, lr in lrs.items())
    return (f"{error}; rolled back to step {restored_step} ({folder}), learning rate "
            f"x{factor:g}, now {rates} (train.nonfinite=rollback: rollback {count} of at most "
            f"{max_rollbacks})")


# -- weights before a save ---------------------------------------------------------------
def check_weights(exported: dict[str, dict[str, torch.Tensor]], step: int,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise NonFiniteError (on every rank alike) if any exported weight is not finite."""
    bad = None
    for network, state in exported.items():
        bad = bad or next((f"{network}: {key}" for key, value in state.items()
                           if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if float(all_reduce(torch.tensor([1.0 if bad else 0.0]))[0]) > 0:
        where = f" ({bad})" if bad else " (on another rank's share)"
        raise NonFiniteError(f"refusing to save the checkpoint of step {step}: its weights are not "
                             f"finite{where}. Earlier checkpoints are kept; lower "
                             "train.optimizer.lr or set train.grad_clip, and run again")


# -- not retried: the worker's stop reaches the driver through the run folder ------------------
def can_hand_over(run_dir: str) -> bool:
    """A local (or shared) run folder carries the stop to the driver; with remote storage the
    worker raises to Ray Train as any failure (and checkpoint.max_failures retries it)."""
    return "://" not in run_dir


def write_stop(run_dir: str, error: NonFiniteError) -> None:
    """Rank 0: leave the error for the driver (see raise_if_stopped)."""
    os.makedirs(run_dir, exist_ok=True)
    temporary = os.path.join(run_dir, STOP_FILE + ".tmp")
    with open(temporary, "w") as handle:
        json.dump({"message": str(error), "time": time.time()}, handle)
    os.replace(temporary, os.path.join(run_dir, STOP_FILE))


def clear_stop(run_dir: str) -> None:
    """Before a run: a previous run's stop is not this one's."""
    if "://" not in run_dir:
        try:
            os.remove(os.path.join(run_dir, STOP_FILE))
        except FileNotFoundError:
            pass


def raise_if_stopped(run_dir: str) -> None:
    """On the driver after training: raise the workers' NonFiniteError, if they stopped on one."""
    path = os.path.join(run_dir, STOP_FILE)
    if is_remote(run_dir) or not os.path.exists(path):
        return
    with open(path) as handle:
        message = json.load(handle)["message"]
    os.remove(path)  # told once; the run's checkpoints and logs keep the rest
    raise NonFiniteError(f"{message}\n(not retried: the same steps would fail the same way; "
                         "checkpoint.max_failures applies to crashes, not to non-finite values)")


def where_a_rerun_continues(run_dir: str) -> str:
    """The last line after a stop: the checkpoint a rerun with the fix continues from (at the
    spec's learning rate: Engine.restore applies a changed one)."""
    from gentrain.checkpoint import newest_good_checkpoint

    if is_remote(run_dir):
        return f"Checkpoints written before it are kept in {run_dir}."
    choice = newest_good_checkpoint(run_dir)
    if choice.folder is None:
        return "No checkpoint was written before it: run again with the fix to start from step 0."
    return (f"Run again with the fix to continue from step {choice.step} ({choice.folder}), the newest "
            "good checkpoint: its weights are finite but may already be diverging; if it stops there "
            "again, move that folder aside to continue from an older one.")


def _rank0_print(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)

