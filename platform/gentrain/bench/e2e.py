"""End to end: `gentrain run` against a plain Ray Train V2 script, side by side.

    gentrain bench e2e                          # vae/debug: 3 rounds of 300 steps, 2 workers
    gentrain bench e2e --rounds 5 --json bench-e2e.json
    gentrain bench e2e --set tracking.enabled=false   # both gentrain runs without MLflow
    gentrain bench e2e --model cifar10-vae      # vae/cifar10's network on CPU: 3 rounds of 60 steps

--model picks what both sides train (bench/e2e_models.py): debug-vae (the default,
vae/debug on the digits) or cifar10-vae (the 19.1M-parameter VAE of vae/cifar10.yaml at
batch 50 per worker, on a fixed synthetic CIFAR-sized set that the bench packs with
gentrain's own packing before any timed run). Each round runs, one after the other and
each as its own process (as a user starts them):

- baseline: bench/baseline_ray_train.py, the same network, loss, batch size, optimizer
  and gradient clipping, the data in memory, DDP, nothing else;
- gentrain (no eval/ckpt): `gentrain run SPEC eval.at_start=false eval.every=0
  checkpoint.every=STEPS`: no evaluation before the first step (the plain script has
  none); the evaluation at the end and the final checkpoint stay, outside the steady span;
- gentrain (spec): debug-vae runs `gentrain run vae/debug` as shipped (eval every 150,
  checkpoints every 100); cifar10-vae scales vae/cifar10's periodic work to the run
  (a checkpoint every third of it, an evaluation at its middle, no Inception metrics:
  e2e_models.py says why, and what else the CPU needs overridden). At its default 60
  steps (progress every 5) the steady span, steps 20 to 60, holds the checkpoints after
  steps 20 and 40 (about 230 MB each: weights and AdamW's moments) and the evaluation
  at step 30; the vae/cifar10 spec itself evaluates every 10,000 and checkpoints every
  5,000 of 50,000 steps, so this row shows periodic work at a far larger share of the
  run than the real spec gives it.

The order rotates from round to round (every kind runs first, second and third once in
three rounds), so a change of the machine's load hits every side, and a run never
starts before the previous run's Ray processes are gone (Ray's daemons outlive the
command by seconds; the run after one would share the CPUs with them). Every ratio is
taken within a round and the table shows the median over rounds.
Both sides write gentrain.timeline marks: the steady rate is the steps from the first
progress step (train.log_every) at or after a third of the run to the last, over the wall
time between them (rank 0). The first third is gentrain's warm-up: the decoded-once data
cache fills as each rank meets its shards (the first few epochs) and Ray's own start-up
work winds down; the rate from the first progress step, warm-up included, is a row of
its own;
the time to the first step counts from the moment the bench starts the process. Steps
per CPU second of rank 0's process (all its threads, MLflow's sender included) is the
same span against CPU time instead of wall time: a cost the load moves far less. The
breakdown says where the seconds before the first step go. Ratios are speed ratios:
above 1 gentrain is faster (rates: gentrain / baseline; times: baseline / gentrain).
The load average is recorded beside each run: on a shared machine, read the ratios.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gentrain.bench.common import publish, timestamp
from gentrain.bench.e2e_models import MODELS, E2EModel, Prepared
from gentrain.timeline import TIMELINE_ENV, read

BASELINE_SCRIPT = Path(__file__).with_name("baseline_ray_train.py")
KINDS = ("baseline", "gentrain_plain", "gentrain_spec")
LABELS = {"baseline": "plain Ray Train", "gentrain_plain": "gentrain (no eval/ckpt)",
          "gentrain_spec": "gentrain (spec)"}
# The phases before the first step, in the order the marks are written; a side lacking a
# mark leaves its phase out (its time falls into the next phase it has).
PHASES = [
    ("cli_start", "python start, imports"),
    ("job_validated", "spec load and validation"),
    ("data_prepared", "dataset packing check"),
    ("ray_started", "ray.init (gentrain: + MLflow run, alongside)"),
    ("trainer_built", "trainer built"),
    ("worker_start", "workers started (placement, process group)"),
    ("engine_start", "worker: tracking logger, restore check"),
    ("dataset_open", "worker: dataset open"),
    ("model_built", "worker: model build"),
    ("strategy_ready", "worker: strategy setup (DDP, optimizer)"),
    ("initial_evaluation_done", "worker: evaluation at the start"),
    ("data_stream_open", "worker: data stream open"),
    ("first_step", "worker: first batch and step"),
]


def run_e2e_bench(rounds: int = 3, steps: int | None = None, workers: int = 2, batch_size: int | None = None,
                  json_path: str | None = "bench-e2e.json", keep: str | None = None,
                  model: str = "debug-vae", overrides: tuple[str, ...] = ()) -> dict:
    """`steps` and `batch_size` default to the model's (debug-vae: 300 and 32; cifar10-vae: 60 and 50).
    `overrides` (`--set`) go last on both gentrain runs' command lines, so they win."""
    if model not in MODELS:
        raise ValueError(f"--model {model!r} is not one of {', '.join(MODELS)}")
    chosen = MODELS[model]
    if overrides:  # a wrong key fails now, not after the first timed run
        from gentrain.validation import load_spec

        load_spec(chosen.spec, list(overrides))
    steps = steps or chosen.steps
    batch_size = batch_size or chosen.batch_size
    folder = Path(keep or tempfile.mkdtemp(prefix="gentrain-bench-e2e-"))
    folder.mkdir(parents=True, exist_ok=True)
    prepared = chosen.prepare(folder)  # data packed before any timed run
    settings = {"model": model, "spec": chosen.spec, "rounds": rounds, "steps": steps, "workers": workers,
                "batch_size": batch_size, "log_every": chosen.log_every, "train_samples": prepared.train_samples,
                "spec_kind_overrides": list(chosen.periodic(steps)), "overrides": list(overrides),
                "statistic": "median over rounds of per-round values and ratios"}
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for number in range(rounds):
        order = KINDS[number % len(KINDS):] + KINDS[:number % len(KINDS)]
        for kind in order:
            command = _command(kind, number, folder, steps, workers, batch_size, chosen, prepared, overrides)
            record = _run(kind, number, folder, steps, command)
            runs[kind].append(record)
            _log(f"round {number + 1}/{rounds} {LABELS[kind]:<24} " + _summary(record))
    result = {
        "benchmark": "e2e",
        "model": model,
        "command": f"gentrain bench e2e --model {model} --rounds {rounds} --steps {steps} --workers {workers} "
                   f"--batch-size {batch_size}" + "".join(f" --set {item}" for item in overrides),
        "timestamp": timestamp(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "settings": settings,
        "rows": _rows(runs, chosen.spec_label),
        "breakdown": _breakdown(runs),
        "runs": runs,
    }
    if keep is None:  # logs and timelines stay; checkpoints and models go (cifar10-vae: about 1 GB a round)
        for name in ("runs", "baseline", "mlartifacts"):
            shutil.rmtree(folder / name, ignore_errors=True)
    publish(result, format_table, json_path, _log)
    _log(f"the runs' logs are in {folder}")
    return result


def _command(kind: str, number: int, folder: Path, steps: int, workers: int, batch_size: int,
             model: E2EModel, prepared: Prepared, overrides: tuple[str, ...] = ()) -> list[str]:
    if kind == "baseline":
        return [sys.executable, str(BASELINE_SCRIPT), "--model", model.name, "--steps", str(steps),
                "--workers", str(workers), "--batch-size", str(batch_size), "--lr", str(model.lr),
                "--log-every", str(model.log_every), *prepared.baseline_args,
                "--storage", str(folder / "baseline")]
    command = [sys.executable, "-m", "gentrain.cli", "run", model.spec, f"name=e2e-{kind}-{number}",
               f"storage_path={folder / 'runs'}", f"train.steps={steps}", f"train.batch_size={batch_size}",
               f"train.log_every={model.log_every}", f"scaling.num_workers={workers}",
               f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", *prepared.gentrain_overrides]
    if kind == "gentrain_plain":
        command += ["eval.at_start=false", "eval.every=0", f"checkpoint.every={steps}"]
    else:
        command += list(model.periodic(steps))
    return command + list(overrides)


def _run(kind: str, number: int, folder: Path, steps: int, command: list[str]) -> dict:
    timeline = folder / f"{kind}-{number}.timeline.jsonl"
    timeline.unlink(missing_ok=True)
    log = folder / f"{kind}-{number}.log"
    env = {**os.environ, TIMELINE_ENV: str(timeline)}
    env.pop("RAY_ADDRESS", None)  # both sides start their own embedded Ray
    load_before = os.getloadavg()[0]
    started = time.time()
    with open(log, "w", encoding="utf-8") as out:
        # Its own session: what its Ray starts can be waited for before the next run.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env,
                                   start_new_session=True)
        code = process.wait()
    wall = time.time() - started
    settled = time.time()
    _wait_for_exit(process.pid)
    settle = time.time() - settled
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"bench e2e: the {LABELS[kind]} run failed (exit {code}); its log {log} ends:\n{tail}")
    marks = read(str(timeline))
    return {"wall_s": wall, "settle_s": settle, "load_before": load_before, "load_after": os.getloadavg()[0],
            "first_step_s": _first(marks, "first_step", started),
            "whole_steps_per_s": _steady(marks),  # from the first progress step: warm-up included
            "steady_steps_per_s": _steady(marks, after=steps // 3),
            "steady_steps_per_cpu_s": _steady(marks, "cpu", after=steps // 3),
            "phases": _phases(marks, started), "log": str(log)}


def _session_processes(session: int) -> list[int]:
    """Processes still in session `session` (a run started in its own session: its Ray)."""
    import psutil

    left = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == session:
                left.append(pid)
        except OSError:
            continue
    return left


def _wait_for_exit(session: int, timeout: float = 60.0) -> None:
    """Until what a run started (its embedded Ray's daemons outlive it) is gone, or `timeout`."""
    deadline = time.monotonic() + timeout
    while left := _session_processes(session):
        if time.monotonic() > deadline:
            _log(f"{len(left)} processes of the previous run still alive after {timeout:.0f} s; going on")
            return
        time.sleep(0.2)


def _first(marks: list[dict], event: str, started: float) -> float | None:
    times = [m["time"] for m in marks if m["event"] == event]
    return times[0] - started if times else None


def _steady(marks: list[dict], clock: str = "time", after: int = 0) -> float | None:
    """Steps per second from the first progress step at or after step `after` to the last;
    clock "cpu": per CPU second of rank 0's process (all its threads), which the machine's
    load moves less."""
    steps = [(m["step"], m.get(clock)) for m in marks if m["event"] == "step" and m["step"] >= after]
    if len(steps) < 2 or steps[0][1] is None:
        return None
    (first_step, first_time), (last_step, last_time) = steps[0], steps[-1]
    return (last_step - first_step) / max(last_time - first_time, 1e-9)


def _phases(marks: list[dict], started: float) -> dict[str, float]:
    """Seconds of each phase before the first step (from the previous mark the run wrote)."""
    seen = {}
    for m in marks:
        seen.setdefault(m["event"], m["time"])
    phases, previous = {}, started
    for event, _ in PHASES:
        if event in seen:
            phases[event] = seen[event] - previous
            previous = seen[event]
    return phases


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _rows(runs: dict[str, list[dict]], spec_label: str = "debug spec") -> list[dict]:
    """The table's rows; `spec_label` names the spec kind's periodic evaluation and checkpoints."""
    base = runs["baseline"]
    rows = []
    measures = [("steady steps/s, no eval/ckpt", "steady_steps_per_s", "gentrain_plain", True),
                ("steps/s from the first progress step, no eval/ckpt", "whole_steps_per_s", "gentrain_plain", True),
                (f"steady steps/s, {spec_label}'s eval/ckpt", "steady_steps_per_s", "gentrain_spec", True),
                ("steps per rank-0 CPU s, no eval/ckpt", "steady_steps_per_cpu_s", "gentrain_plain", True),
                (f"whole run wall s ({spec_label})", "wall_s", "gentrain_spec", False),
                ("whole run wall s (no eval/ckpt)", "wall_s", "gentrain_plain", False),
                ("time to first step s, no eval/ckpt", "first_step_s", "gentrain_plain", False),
                (f"time to first step s ({spec_label})", "first_step_s", "gentrain_spec", False)]
    for label, key, kind, rate in measures:
        pairs = [(b[key], g[key]) for b, g in zip(base, runs[kind]) if b.get(key) and g.get(key)]
        ratios = [(g / b) if rate else (b / g) for b, g in pairs]
        rows.append({"measure": label, "gentrain_run": kind, "baseline": _median(b for b, _ in pairs),
                     "gentrain": _median(g for _, g in pairs), "ratio": _median(ratios),
                     "ratios": ratios, "higher_is_better": rate})
    loads = [r[k] for kind in KINDS for r in runs[kind] for k in ("load_before", "load_after")]
    rows.append({"measure": "load average (1 min) during the runs", "min": min(loads), "max": max(loads)})
    return rows


def _breakdown(runs: dict[str, list[dict]]) -> list[dict]:
    lines = []
    for event, label in PHASES:
        entry = {"phase": label, "event": event}
        for kind in KINDS:
            entry[kind] = _median(r["phases"].get(event) for r in runs[kind])
        if any(entry[kind] is not None for kind in KINDS):
            lines.append(entry)
    return lines


def format_table(result: dict) -> str:
    def number(value, digits=1):
        if value is None:
            return "-"
        return f"{value:.{max(digits, 2 if abs(value) < 10 else 1)}f}"  # cifar10-vae: under 1 step/s

    width = 52
    lines = [f"{'':<{width}} {'plain Ray Train':>15} {'gentrain run':>13} {'ratio':>7}"]
    for row in result["rows"]:
        if "min" in row:
            lines.append(f"{row['measure']:<{width}} {row['min']:.2f} to {row['max']:.2f}")
            continue
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"{row['measure']:<{width}} {number(row['baseline']):>15} {number(row['gentrain']):>13} "
                     f"{ratio:>7}")
    lines.append("ratio: speed of gentrain relative to the plain script (above 1: gentrain faster), "
                 "median of the per-round ratios")
    lines.append("")
    lines.append(f"{'time to first step, by phase (s)':<{width}} {'plain Ray Train':>15} {'no eval/ckpt':>13} "
                 f"{'spec':>7}")
    for entry in result["breakdown"]:
        lines.append(f"{entry['phase']:<{width}} {number(entry['baseline'], 2):>15} "
                     f"{number(entry.get('gentrain_plain'), 2):>13} {number(entry.get('gentrain_spec'), 2):>7}")
    settings = result["settings"]
    model = settings.get("model", "debug-vae")
    lines.append(f"{model} ({settings.get('spec', 'vae/debug')}): {settings['rounds']} alternating rounds of "
                 f"{settings['steps']} steps, {settings['workers']} workers, batch {settings['batch_size']} per "
                 f"worker; {result['machine']['cpu_count']} CPUs")
    if settings.get("overrides"):
        lines.append(f"both gentrain runs with: {' '.join(settings['overrides'])}")
    return "\n".join(lines)


def _summary(record: dict) -> str:
    def number(value):
        return "-" if value is None else f"{value:.2f}"

    return (f"steady {number(record['steady_steps_per_s'])} steps/s | first step {number(record['first_step_s'])} s"
            f" | wall {record['wall_s']:.1f} s (+{record['settle_s']:.1f} s until its Ray exited) | load {record['load_before']:.2f}")


def _log(message: str) -> None:
    print(f"[bench e2e] {message}", flush=True)
