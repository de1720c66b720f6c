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

import csv
import io
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback

from gentrain.loop import EVALUATION_MARK
from gentrain.schema import SpecError
from gentrain.spec import JobSpec, apply_overrides, dump_yaml, read_yaml
from gentrain.spec_checks import name_problems
from gentrain.sweep.space import SweepParam, parse_params
from gentrain.sweep.trial import (OUTCOME_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG,
                                  TrialContext, run_trial, trial_data)
from gentrain.validation import ValidatedJob, check_job, find_spec_file, validate

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
class TrialRow:
    trial: str
    params: dict
    metric: float | None
    steps: int | None
    status: str  # completed | stopped early | failed | not run
    error: str | None = None


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
    uri, parent = _open_parent(first, name, sweep_dir, request, space, base)
    try:
        return _tune(request, space, scheduler, base, str(path), name, storage, sweep_dir,
                     first, need, at_once, uri, parent)
    except BaseException:
        if parent:
            _end_parent(uri, parent, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
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
    print(f"[gentrain] sweep {name}: {request.samples} sample(s) of {len(space)} param(s), "
          f"{at_once} trial(s) at once (each: {_resources_text(need)}), "
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
    rows = _rows(results, [param.key for param in space], request, first.train.steps)
    unfinished = set(observer.unfinished()) if observer is not None else set()
    expected = request.samples * math.prod(len(param.values) for param in space if param.kind == "grid")
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
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if request.scheduler == "fifo":
        return FIFOScheduler()
    if not spec.eval.every:
        print("[gentrain] warning: eval.every=0: trials report their metric only at the end, so "
              "ASHA cannot stop any early; set eval.every (e.g. eval.every="
              f"{max(1, spec.train.steps // 8)})", file=sys.stderr, flush=True)
    # time = optimizer steps: a rung is an evaluation at grace_period * factor^k steps.
    grace = min(spec.eval.every or spec.train.steps, spec.train.steps)
    return ASHAScheduler(time_attr="step", max_t=spec.train.steps, grace_period=grace,
                         reduction_factor=request.reduction_factor)


def _pinned(base: dict, uri: str | None) -> dict:
    """The base mapping with the tracking URI the driver resolved: a trial runs in another
    working folder (and maybe on another node), where ./mlflow.db or $MLFLOW_TRACKING_URI
    would not be the driver's."""
    if uri is None:
        return base
    data = dict(base)
    data["tracking"] = {**(base.get("tracking") or {}), "uri": uri}
    return data


# -- MLflow: the parent run and the children's statuses -------------------------------------
def _open_parent(spec: JobSpec, name: str, sweep_dir: str, request: SweepRequest,
                 space: list[SweepParam], base: dict) -> tuple[str | None, str | None]:
    if not spec.tracking.enabled:
        return None, None
    import mlflow

    from gentrain import tracking
    from gentrain.launch.local import TrackingUnavailable

    uri = tracking.resolve_tracking_uri(spec.tracking.uri)
    tracking.fail_fast_http()
    try:
        client = mlflow.MlflowClient(uri)
        previous = _previous_parent(client, uri, spec.tracking.experiment, name, sweep_dir) if request.resume else None
        run_id = tracking.open_run(uri, spec.tracking.experiment, run_name=name, run_id=previous,
                                   tags={SWEEP_TAG: name, ROLE_TAG: "parent", "gentrain.sweep.dir": sweep_dir,
                                         "gentrain.job_type": spec.job.type})
        if previous is None:
            params = {f"space.{param.key}": param.text for param in space}
            params.update({"sweep.spec": request.spec, "sweep.metric": request.metric,
                           "sweep.mode": request.mode, "sweep.samples": request.samples,
                           "sweep.scheduler": request.scheduler,
                           "sweep.max_concurrent": request.max_concurrent or "cluster",
                           "sweep.overrides": " ".join(request.overrides)})
            tracking.log_params_flat(uri, run_id, params)
            client.log_text(run_id, _space_yaml(space), "sweep/space.yaml")
            client.log_text(run_id, dump_yaml(spec), "sweep/base-spec.yaml")
    except Exception as exc:  # noqa: BLE001 - any client failure means the same to the user
        raise TrackingUnavailable(
            f"tracking.uri: cannot reach MLflow at {uri} ({type(exc).__name__}: {exc}). Start the "
            "server, fix tracking.uri / MLFLOW_TRACKING_URI, or sweep without tracking: "
            "tracking.enabled=false") from None
    # The line `gentrain run` prints (`gentrain sweep --address` reads it), then what it is.
    print(f"[gentrain] mlflow run: {run_id} | experiment: {spec.tracking.experiment} | "
          f"{tracking.run_url(uri, run_id)}", flush=True)
    print(f"[gentrain] (the sweep's parent run: each trial's run is its child)", flush=True)
    return uri, run_id


def _previous_parent(client, uri: str, experiment: str, name: str, sweep_dir: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.`{SWEEP_TAG}` = '{_quoted(name)}' and "
                                            f"tags.`{ROLE_TAG}` = 'parent'",
                              order_by=["attributes.start_time DESC"])
    runs = [run for run in runs if run.data.tags.get("gentrain.sweep.dir") == sweep_dir]
    return runs[0].info.run_id if runs else None


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")


def _space_yaml(space: list[SweepParam]) -> str:
    import yaml

    return yaml.safe_dump({param.key: {"kind": param.kind, "values": list(param.values),
                                       "as_written": param.text} for param in space}, sort_keys=False)


def _end_parent(uri: str, run_id: str, status: str) -> None:
    from gentrain import tracking

    ending = tracking.end_run(uri, run_id, status, None)
    if not ending.marked:
        print(f"warning: could not mark the sweep's MLflow run {run_id} {status}: {ending.error}",
              file=sys.stderr, flush=True)


class ChildRuns(Callback):
    """A Ray Tune callback on the driver: the outcome of each trial on its MLflow child run.

    A trial ASHA stops ends with its actor, before its own `gentrain run` code can mark the
    run: it is marked KILLED here (tag gentrain.sweep.outcome=stopped_early); a completed
    trial's run was marked FINISHED and a failed one's FAILED by the trial itself (here only
    if it could not). Never raises: tracking must not stop the sweep."""

    # The instance Tune calls in this process: after Tuner.restore that is the one pickled
    # with the sweep's state, not one the driver made.
    active: "ChildRuns | None" = None

    def __init__(self, uri: str | None, parent: str | None, steps: int, metric: str):
        self.uri, self.parent, self.steps, self.metric = uri, parent, steps, metric
        self.last: dict[str, dict] = {}  # trial id -> its latest evaluation report
        self.started: set[str] = set()
        self.ended: set[str] = set()  # completed, stopped or failed

    def setup(self, **info):
        ChildRuns.active = self

    def unfinished(self) -> list[str]:
        """Trials started in this process that never ended: Tune was interrupted (and saved its
        state); it does not call on_trial_complete for them."""
        return sorted(self.started - self.ended)

    def mark_interrupted(self) -> None:
        """The unfinished trials' runs KILLED (a --resume continues them in the same runs)."""
        for trial_id in self.unfinished():
            self._mark(trial_id, "KILLED", "interrupted", self.last.get(trial_id, {}))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.add(trial.trial_id)
        print(f"[gentrain] trial {trial.trial_id} started: {_params_text(trial.config)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "step" in result:
            self.last[trial.trial_id] = dict(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        last = self.last.get(trial.trial_id, {})
        step = int(last.get("step", 0))
        outcome = "completed" if step >= self.steps else "stopped_early"
        value = last.get(self.metric)
        print(f"[gentrain] trial {trial.trial_id} {outcome.replace('_', ' ')} at step {step}/{self.steps}"
              f" ({self.metric} {_value(value)})", flush=True)
        self._mark(trial.trial_id, "FINISHED" if outcome == "completed" else "KILLED", outcome, last)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        last = self.last.get(trial.trial_id, {})
        print(f"[gentrain] trial {trial.trial_id} failed at step {last.get('step', 0)}"
              f" (the sweep goes on; its error: {trial.error_file or 'see the log above'})", flush=True)
        self._mark(trial.trial_id, "FAILED", "failed", last)

    def _mark(self, trial_id: str, status: str, outcome: str, last: dict) -> None:
        if not (self.uri and self.parent):
            return
        try:
            import mlflow

            client = mlflow.MlflowClient(self.uri)
            run = self._child(client, trial_id)
            if run is None:
                return  # the trial failed before its run was opened (e.g. its spec was refused)
            step = int(last.get("step", 0))
            client.set_tag(run.info.run_id, OUTCOME_TAG, outcome)
            client.set_tag(run.info.run_id, "gentrain.sweep.last_step", str(step))
            if outcome == "stopped_early":
                # Its rank 0 was ended with the trial: what its logger had not sent yet
                # is still in the trial's spool; the evaluation that decided is logged here.
                self._log_last(client, run.info.run_id, last, step)
            # A trial stopped early may have ended its own run FAILED as its actors went (it
            # reads the tag set above when it ends after this: gentrain.sweep.trial.stopped_status).
            if run.info.status == "RUNNING" or (outcome in ("stopped_early", "interrupted")
                                                and run.info.status == "FAILED"):
                client.set_terminated(run.info.run_id, status)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: trial {trial_id}: could not record its outcome ({outcome}) in MLflow: {exc}",
                  file=sys.stderr, flush=True)

    @staticmethod
    def _log_last(client, run_id: str, last: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value in last.items()
                   if "/" in key and key != EVALUATION_MARK and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)]
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start:start + 500])

    def _child(self, client, trial_id: str):
        parent = client.get_run(self.parent)
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{TRIAL_TAG}` = '{_quoted(trial_id)}' and "
                                                f"tags.`{PARENT_TAG}` = '{self.parent}'")
        return runs[0] if runs else None


# -- the results ----------------------------------------------------------------------------
def _rows(results, keys: list[str], request: SweepRequest, steps: int) -> list[TrialRow]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or Path(result.path).name
        params = {key: (result.config or {}).get(key) for key in keys}
        value = metrics.get(request.metric)
        step = metrics.get("step")
        if result.error is not None:
            status, error = "failed", _short_error(result.error)
        elif step is None:
            status, error = "not run", None
        else:
            status, error = ("completed" if step >= steps else "stopped early"), None
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        rows.append(TrialRow(trial, params, value, int(step) if step is not None else None, status, error))
    sign = 1.0 if request.mode == "min" else -1.0
    rows.sort(key=lambda row: (row.status == "failed", row.metric is None,
                               sign * row.metric if row.metric is not None else 0.0, row.trial))
    return rows


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)):\s")


def _short_error(error: BaseException) -> str:
    """The line of the trial's own exception (Tune wraps it with its traceback)."""
    lines = str(error).strip().splitlines()
    found = [line for line in lines if _ERROR_LINE.match(line)]
    text = found[-1] if found else (lines[-1] if lines else type(error).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def _params_text(config: dict) -> str:
    return ", ".join(f"{key}={_value(value)}" for key, value in config.items())


def table(rows: list[TrialRow], keys: list[str], metric: str, limit: int | None = None) -> str:
    """The trials as a fixed-width text table, best first."""
    header = ["trial", *keys, metric, "steps", "status"]
    body = [[row.trial, *(_value(row.params.get(key)) for key in keys),
             _value(row.metric), _value(row.steps), row.status + (f": {row.error}" if row.error else "")]
            for row in rows[:limit]]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths)) + "  " + line[-1]
             for line in [header, *body]]
    return "\n".join(lines)


def _value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv(rows: list[TrialRow], keys: list[str], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *keys, metric, "steps", "status", "error"])
    for row in rows:
        writer.writerow([row.trial, *(row.params.get(key) for key in keys),
                         "" if row.metric is None else row.metric, "" if row.steps is None else row.steps,
                         row.status, row.error or ""])
    return out.getvalue()


def _markdown(rows: list[TrialRow], keys: list[str], metric: str) -> str:
    header = ["trial", *keys, metric, "steps", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        status = row.status + (f": {row.error}" if row.error else "")
        cells = [row.trial, *(_value(row.params.get(key)) for key in keys), _value(row.metric),
                 _value(row.steps), status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_spec_text(base: dict, params: dict, name: str, source: str) -> str:
    """The best trial's spec as a runnable YAML: the base with its params, named <sweep>-best,
    storing where the base spec stores; validated as a run's spec is."""
    data = trial_data(base, params, name=name)
    return dump_yaml(validate(data, source).spec)


def _finish(request: SweepRequest, name: str, sweep_dir: str, base: dict, rows: list[TrialRow],
            uri: str | None, parent: str | None, seconds: float, at_once: int) -> SweepSummary:
    keys = [key for key in (rows[0].params if rows else {})]
    ranked = [row for row in rows if row.status in ("completed", "stopped early") and row.metric is not None]
    best = ranked[0] if ranked else None
    files: dict[str, str] = {}
    texts = {"results.csv": _csv(rows, keys, request.metric), "results.md": _markdown(rows, keys, request.metric)}
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
        pointer = _log_results(uri, parent, texts, best, request.metric)
    return SweepSummary(name, sweep_dir, rows, best, files.get("best.yaml"), parent, pointer, seconds,
                        at_once, files)


def _log_results(uri: str, parent: str, texts: dict, best: TrialRow | None, metric: str) -> str | None:
    from gentrain import tracking

    try:
        import mlflow

        client = mlflow.MlflowClient(uri)
        for filename, text in texts.items():
            client.log_text(parent, text, f"sweep/{filename}")
        if best is not None:
            client.set_tag(parent, "gentrain.sweep.best_trial", best.trial)
            client.log_metric(parent, f"best/{metric}", best.metric)
        pointer = tracking.run_url(uri, parent)
    except Exception as exc:  # noqa: BLE001 - the files are on disk either way
        print(f"warning: could not log the sweep's results to MLflow run {parent}: {exc}",
              file=sys.stderr, flush=True)
        pointer = None
    _end_parent(uri, parent, "FINISHED")
    return pointer
