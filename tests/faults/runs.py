"""`gentrain run` subprocesses of the fault suite, and what they are compared against.

Every run that is compared with an uninterrupted one uses SETTINGS (vae/debug, two Ray
workers, fp32, 12 steps, a checkpoint every 2): the `reference` fixture (conftest.py) is
that uninterrupted run, made once per session. Logging, tracking and checkpoint retention
do not change the weights, so a test may override those (`train.log_every`,
`tracking.*`, `checkpoint.max_failures`, `checkpoint.keep`), nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

from gentrain.checkpoint import MODEL_FILE, step_dir_name

ROOT = Path(__file__).resolve().parents[2]
NAME = "vae-debug"
STEPS = 12
SETTINGS = [f"train.steps={STEPS}", "train.schedule.warmup_steps=2", "checkpoint.every=2",
            "checkpoint.keep=10", "scaling.num_workers=2", "eval.every=0", "eval.max_batches=1",
            "train.log_every=4", "tracking.enabled=false", "strategy.precision=fp32"]
RESUMED = re.compile(r"\[gentrain\] resumed from step (\d+) \((.*?)\)")


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT / "jobs"),
                                         env.get("PYTHONPATH", "")])
    return env


def command(storage: Path, *extra: str) -> dict:
    """subprocess keyword arguments of `gentrain run vae/debug` with SETTINGS, then `extra`."""
    storage.mkdir(parents=True, exist_ok=True)
    return dict(args=[sys.executable, "-m", "gentrain.cli", "run", "vae/debug", f"name={NAME}",
                      f"storage_path={storage}", *SETTINGS, *extra],
                cwd=storage.parent, env=environment(), text=True)


def gentrain_run(storage: Path, *extra: str) -> subprocess.CompletedProcess:
    """A run that must succeed: exit 0 and no traceback."""
    result = subprocess.run(**command(storage, *extra), capture_output=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    return result


def kill_a_worker_at_step_4_and_finish(reference: Path, storage: Path, *extra: str) -> None:
    """Start `gentrain run` with checkpoint.max_failures=1, SIGKILL a train worker the moment
    step-4 is complete on disk (its report may not have reached Ray's controller yet), and
    check the restarted workers continue from step 4 or later, never from the start, and
    the run ends with `reference`'s weights."""
    import signal

    from gentrain.checkpoint import checkpoint_problem
    from processes import train_workers

    run = subprocess.Popen(**command(storage, *extra, "checkpoint.max_failures=1"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = storage / NAME / step_dir_name(4)
    deadline = time.monotonic() + 240
    while checkpoint_problem(first) is not None:
        assert run.poll() is None, run.stdout.read()[-6000:]
        assert time.monotonic() < deadline, "step-4 never became a complete checkpoint"
        time.sleep(0.02)
    victims = train_workers(run.pid)
    assert victims, "no RayTrainWorker process found to kill"
    os.kill(victims[-1].pid, signal.SIGKILL)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output[-6000:]
    resumed = re.findall(r"\[gentrain\] resumed from step (\d+) \((.*?)\)", output)
    assert resumed, f"killed {victims[-1].pid} but no restart:\n{output[-6000:]}"
    step, folder = int(resumed[0][0]), Path(resumed[0][1])
    assert step >= 4 and folder == storage / NAME / step_dir_name(step), output[-6000:]
    assert_same_weights(reference, storage / NAME)


def weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    saved = torch.load(run_dir / step_dir_name(step) / MODEL_FILE, map_location="cpu", weights_only=True)
    return {f"{network}.{key}": value for network, state in saved["networks"].items()
            for key, value in state.items()}


def assert_same_weights(reference: Path, run_dir: Path) -> None:
    """The final model.pt tensors of two run folders are equal bit for bit."""
    expected, got = weights(reference), weights(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0, msg=key)


class Gentrain:
    """A `gentrain` subprocess whose output lines are kept with the time each arrived."""

    def __init__(self, args: list[str], cwd: Path, **popen):
        self.process = subprocess.Popen([sys.executable, "-m", "gentrain.cli", *args], cwd=cwd,
                                        env=environment(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def run(cls, storage: Path, *extra: str, **popen) -> "Gentrain":
        """`gentrain run vae/debug` with SETTINGS, then `extra` (as `command`)."""
        spec = command(storage, *extra)
        return cls(spec["args"][3:], cwd=spec["cwd"], **popen)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str | re.Pattern, start: int = 0, timeout: float = 300) -> tuple[int, re.Match]:
        """(line index, match) of the first line from `start` on that matches `pattern`."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(start, len(self.lines)):
                found = pattern.search(self.lines[index][1])
                if found:
                    return index, found
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern.pattern!r}:\n{self.output()[-6000:]}")

    def wait_for_line(self, text: str, timeout: float = 300) -> float:
        """When the first line containing `text` arrived."""
        index, _ = self.wait_for(re.escape(text), timeout=timeout)
        return self.lines[index][0]

    def finish(self, timeout: float = 300) -> tuple[int, float]:
        returncode = self.process.wait(timeout=timeout)
        ended = time.monotonic()
        self._reader.join(timeout=10)
        return returncode, ended


def steps_of(uri: str, run_id: str) -> dict[str, list[int]]:
    """Every metric's steps in the order MLflow holds them (by timestamp, then step)."""
    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    return {key: [metric.step for metric in sorted(client.get_metric_history(run_id, key),
                                                     key=lambda m: (m.timestamp, m.step))]
            for key in keys}


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def assert_clean_record(uri: str, run_id: str, after: int) -> dict[str, list[int]]:
    """No (metric, step) point twice, every metric's steps strictly increasing, and every
    train/loss step (train.log_every=1) from `after` + 1 to the end present."""
    steps = steps_of(uri, run_id)
    for key, logged in steps.items():
        assert all(a < b for a, b in zip(logged, logged[1:])), (key, logged)
    expected = list(range(after + 1, STEPS + 1))
    if expected:
        assert steps["train/loss"][-len(expected):] == expected, steps["train/loss"]
    return steps
