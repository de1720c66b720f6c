"""`gentrain sweep`: Ray Tune trials of one spec, each a gentrain training run with its own
Ray Train workers, early stopping by ASHA, one MLflow parent run with a child run per trial.

    gentrain sweep vae/debug --param train.optimizer.lr=loguniform(1e-4,1e-2) \\
        --samples 16 --metric eval/elbo --mode max

Before any trial starts, the spec and every value of every param (both ends of a range,
each listed value; the other params at their first value) pass the checks `gentrain run`
makes (gentrain.validation.check_job). Trials run as many at once as the cluster's
resources hold (each needs scaling.num_workers workers' CPUs/GPUs), at most
--max-concurrent. Trial <id> trains in <storage_path>/<sweep>/<id>; Tune's own state is in
<storage_path>/<sweep> too, so `--resume` continues an interrupted sweep (Tuner.restore).
At the end: a table of the trials (best first) printed, written to results.csv/results.md
in the sweep's folder and logged to the parent run, and the best trial's spec as best.yaml,
runnable with `gentrain run`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from gentrain.schema import SpecError
from gentrain.spec import JobSpec, apply_overrides, read_yaml
from gentrain.spec_checks import name_problems
from gentrain.sweep.results import TrialRow, best_spec_text, csv_text, markdown_text, trial_rows
from gentrain.sweep.runs import ChildRuns, end_parent, log_results, open_parent
from gentrain.sweep.space import SweepParam, parse_params
from gentrain.sweep.trial import TrialContext, run_trial, trial_data
from gentrain.validation import ValidatedJob, check_job, find_spec_file

SCHEDULERS = ("asha", "fifo")
TRIAL_DRIVER_MEMORY = 2**20  # bytes of Ray's `memory` resource each trial's driver function holds


@dataclass
class SweepRequest:
    spec: str
    overrides: list[str]
    params: list[str]
    metric: str
    mode: str
    samples: int = 1
    scheduler: str = "asha"
    max_concurrent: int | None = None
    reduction_factor: float = 2.0
    name: str | None = None
    resume: bool = False


class SweepInterrupted(KeyboardInterrupt):
    """Tune stopped at a Ctrl-C or SIGTERM and saved its state: `--resume` continues."""

    def __init__(self, unfinished: int, sweep_dir: str, rows: list):
        super().__init__(f"{unfinished} trial(s) unfinished")
        self.unfinished, self.sweep_dir, self.rows = unfinished, sweep_dir, rows


@dataclass
class SweepSummary:
    name: str
    sweep_dir: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_spec: str | None
    parent_run_id: str | None
    parent_pointer: str | None
    seconds: float
    concurrency: int
    files: dict = field(default_factory=dict)


def request_problems(request: SweepRequest) -> list[str]:
    problems = []
    if request.mode not in ("min", "max"):
        problems.append(f"--mode: {request.mode!r}; write --mode min or --mode max")
    if request.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler: {request.scheduler!r}; known: {', '.join(SCHEDULERS)}")
    if request.samples < 1:
        problems.append(f"--samples: {request.samples}; give at least 1 trial")
    if request.max_concurrent is not None and request.max_concurrent < 1:
        problems.append(f"--max-concurrent: {request.max_concurrent}; give at least 1 (or leave it "
                        "out: as many as the cluster holds)")
    if not request.reduction_factor > 1:
        problems.append(f"--reduction-factor: {request.reduction_factor}; must be > 1 (2 keeps the "
                        "better half at each ASHA rung)")
    if not request.metric.strip():
        problems.append("--metric: empty; name a reported metric, e.g. --metric eval/elbo or train/loss")
    if not request.params:
        problems.append("--param: none given; a sweep needs at least one, e.g. "
                        "--param train.optimizer.lr=loguniform(1e-4,1e-2)")
    return problems


def check_space(base: dict, space: list[SweepParam], source: str, check=check_job) -> list[ValidatedJob]:
    """The spec with every param at its first value, then each other value of each param
    (the rest at their first), through gentrain.validation.check_job (what `gentrain run`
    asks) before any trial: SpecError lists every problem, a param's naming the --param and
    its value. Returns the jobs checked, the first-values one first (their scaling sizes the
    trials' resources)."""
    firsts = {param.key: param.edge_values()[0] for param in space}
    jobs, problems, seen = [], [], set()
    try:
        jobs.append(check(trial_data(base, firsts), source))
    except SpecError as exc:
        for problem in exc.problems:
            seen.add(problem)
            field = problem.split(":")[0].strip()
            about = [param for param in space if param.key == field or param.key.startswith(field + ".")
                     or field.startswith(param.key + ".")]
            problems.append(problem if not about else
                            f"--param {about[0].key}={about[0].text}: at {firsts[about[0].key]!r}: {problem}")
    for param in space:
        for value in param.edge_values()[1:]:
            try:
                jobs.append(check(trial_data(base, {**firsts, param.key: value}), source))
            except SpecError as exc:  # the base's own problems were listed once, above
                problems += [f"--param {param.key}={param.text}: at {value!r}: {problem}"
                             for problem in exc.problems if problem not in seen]
    if problems:
        raise SpecError(problems, source)
    return jobs


def trial_resources(jobs: list[ValidatedJob]) -> dict[str, float]:
    """What one trial's workers hold at most (the largest over the checked values)."""
    need: dict[str, float] = {}
    for job in jobs:
        scaling = job.spec.scaling
        per_worker = {"CPU": 1.0, **({"GPU": 1.0} if scaling.use_gpu else {}),
                      **{k: float(v) for k, v in scaling.resources_per_worker.items()}}
        for key, value in per_worker.items():
            need[key] = max(need.get(key, 0.0), value * scaling.num_workers)
    return {key: value for key, value in need.items() if value > 0}


def concurrency(need: dict[str, float], cluster: dict[str, float], requested: int | None) -> int:
    """Trials at once: as many as the cluster's resources hold, at most `requested`."""
    fits = min((int(cluster.get(key, 0.0) // value) for key, value in need.items()), default=1)
    if fits < 1:
        lacking = ", ".join(f"{key} {value:g} (cluster: {cluster.get(key, 0.0):g})"
                            for key, value in need.items() if cluster.get(key, 0.0) < value)
        raise ValueError(f"scaling: one trial needs {lacking}; lower scaling.num_workers or "
                         "scaling.resources_per_worker, or add nodes")
    return min(fits, requested) if requested else fits


def run_sweep(request: SweepRequest) -> SweepSummary:
    problems = request_problems(request)
    if problems:
        raise ValueError("\n".join(problems))
    space = parse_params(request.params)
    path = find_spec_file(request.spec)
    base = apply_overrides(read_yaml(path), request.overrides)
    jobs = check_space(base, space, str(path))
    first = jobs[0].spec
    name = request.name or f"{base.get('name') or first.name}-sweep"
    problems = [problem.replace("name:", "--name:", 1) for problem in name_problems(name)]
    if problems:
        raise ValueError("\n".join(problems))
    storage = first.storage_path  # resolved on the driver (absolute, or a URL)
    sweep_dir = os.path.join(storage, name)
    scheduler = _scheduler(request, first)

    from ray import tune

    exists = tune.Tuner.can_restore(sweep_dir)
    if exists and not request.resume:
        raise ValueError(f"--name: sweep {name!r} exists in {sweep_dir}; add --resume to continue it, "
                         "or give a new --name")
    if request.resume and not exists:
        raise ValueError(f"--resume: no sweep {name!r} to continue in {sweep_dir} (no Tune state "
                         "there); leave --resume out to start it")

    from gentrain.launch.local import init_ray, prepare_data

    prepare_data(first)  # a `builtin:` source packed once, before trials could race to do it
    init_ray(jobs[0].spec)
    import ray

    need = trial_resources(jobs)
    at_once = concurrency(need, ray.cluster_resources(), request.max_concurrent)
    uri, parent = open_parent(first, name, sweep_dir, request, space, base)
    try:
        return _tune(request, space, scheduler, base, str(path), name, storage, sweep_dir,
                     first, need, at_once, uri, parent)
    except BaseException:
        if parent:
            end_parent(uri, parent, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise


def _tune(request: SweepRequest, space: list[SweepParam], scheduler, base: dict, source: str, name: str,
          storage: str, sweep_dir: str, first: JobSpec, need: dict, at_once: int,
          uri: str | None, parent: str | None) -> SweepSummary:
    from ray import tune

    context = TrialContext(base=_pinned(base, uri), source=source, sweep=name,
                           sweep_dir=sweep_dir, parent_run_id=parent)
    # The trial's driver function holds no CPU: its Ray Train workers hold the trial's
    # resources, and --max-concurrent/the cluster's size limit the trials at once. (Tune
    # refuses an empty request; 1 MiB of Ray's `memory` resource is the token it holds.)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    children = ChildRuns(uri, parent, first.train.steps, request.metric)
    expected = request.samples * math.prod(len(param.values) for param in space if param.kind == "grid")
    print(f"[gentrain] sweep {name}: {expected} trial(s) of {len(space)} param(s), "
          f"{min(at_once, expected)} at once (each: {_resources_text(need)}), "
          f"{request.scheduler} on {request.metric} ({request.mode}) | {sweep_dir}", flush=True)
    started = time.monotonic()
    if request.resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={param.key: param.to_tune() for param in space},
            tune_config=tune.TuneConfig(
                metric=request.metric, mode=request.mode, scheduler=scheduler,
                num_samples=request.samples, max_concurrent_trials=at_once,
                trial_name_creator=_trial_id, trial_dirname_creator=_trial_id),
            # verbose=0: ChildRuns prints one line per trial event instead of Tune's tables.
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[children],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0),
        )
    ChildRuns.active = None
    from gentrain.launch.local import cluster_address

    if cluster_address() is not None:
        # A job's working folder (Ray's unpacked working_dir) can be removed under its driver
        # while trials come and go on the cluster, and Tune resolves its result paths
        # against the working folder at the end (os.path.relpath): FileNotFoundError from
        # os.getcwd. Every path the sweep uses is absolute by now.
        os.chdir(tempfile.gettempdir())
    results = tuner.fit()
    observer = ChildRuns.active
    rows = trial_rows(results, [param.key for param in space], request.metric, request.mode, first.train.steps)
    unfinished = set(observer.unfinished()) if observer is not None else set()
    if unfinished or len(rows) < expected:
        # Ctrl-C / `gentrain stop`: Tune saved its state and returned.
        if observer is not None:
            observer.mark_interrupted()
        for row in rows:
            if row.trial in unfinished:
                row.status = "interrupted"
        raise SweepInterrupted(max(len(unfinished), expected - len(rows)) if not unfinished else
                               len(unfinished) + expected - len(rows), sweep_dir, rows)
    return _finish(request, name, sweep_dir, base, rows, uri, parent, time.monotonic() - started, at_once)


def _trial_id(trial) -> str:
    return trial.trial_id


def _resources_text(need: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {key}" for key, value in sorted(need.items()))


def _scheduler(request: SweepRequest, spec: JobSpec):
    from ray.tune.schedulers import FIFOScheduler

    if request.scheduler == "fifo":
        return FIFOScheduler()
    if not spec.eval.every:
        print("[gentrain] warning: eval.every=0: trials report their metric only at the end, so "
              "ASHA cannot stop any early; set eval.every (e.g. eval.every="
              f"{max(1, spec.train.steps // 8)})", file=sys.stderr, flush=True)
    # time = optimizer steps: a rung is an evaluation at grace_period * factor^k steps.
    grace = min(spec.eval.every or spec.train.steps, spec.train.steps)
    return _LastEvaluationContinues(time_attr="step", max_t=spec.train.steps, grace_period=grace,
                                    reduction_factor=request.reduction_factor)


class _LastEvaluationContinues(ASHAScheduler):
    """ASHA that lets a trial's evaluation at train.steps pass: Tune's ASHA stops a trial as
    soon as it reports max_t, which ends its actor while its `gentrain run` finishes up (the
    model logged to its MLflow run, the attempt's wall time), so even the best trial's run had
    no model. Its training is over there either way; it ends by itself seconds later, and
    on_trial_complete records it at the last rung."""

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _pinned(base: dict, uri: str | None) -> dict:
    """The base mapping with the tracking URI the driver resolved: a trial runs in another
    working folder (and maybe on another node), where ./mlflow.db or $MLFLOW_TRACKING_URI
    would not be the driver's."""
    if uri is None:
        return base
    data = dict(base)
    data["tracking"] = {**(base.get("tracking") or {}), "uri": uri}
    return data


def _finish(request: SweepRequest, name: str, sweep_dir: str, base: dict, rows: list[TrialRow],
            uri: str | None, parent: str | None, seconds: float, at_once: int) -> SweepSummary:
    keys = [key for key in (rows[0].params if rows else {})]
    ranked = [row for row in rows if row.status in ("completed", "stopped early") and row.metric is not None]
    best = ranked[0] if ranked else None
    files: dict[str, str] = {}
    texts = {"results.csv": csv_text(rows, keys, request.metric), "results.md": markdown_text(rows, keys, request.metric)}
    if best is not None:
        texts["best.yaml"] = best_spec_text(base, best.params, f"{name}-best", request.spec)
    from gentrain.paths import is_remote

    if not is_remote(sweep_dir):
        for filename, text in texts.items():
            target = Path(sweep_dir) / filename
            target.write_text(text, encoding="utf-8")
            files[filename] = str(target)
    pointer = None
    if parent:
        pointer = log_results(uri, parent, texts, best, request.metric)
    return SweepSummary(name, sweep_dir, rows, best, files.get("best.yaml"), parent, pointer, seconds,
                        at_once, files)


