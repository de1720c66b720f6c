"""The driver: one MLflow run per job, then Ray Train on an embedded (or given) Ray.

    gentrain run vae/debug                     # embedded Ray: ray.init(address="local")
    RAY_ADDRESS=auto gentrain run vae/debug    # inside a cluster (what `submit` runs)

Running the same spec (same `name` and `storage_path`) again continues from the latest
checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from gentrain.checkpoint import forget_ray_snapshot, newest_good_checkpoint
from gentrain.data.index import default_cache_dir, resolve_builtin
from gentrain.launch.storage import check_writable
from gentrain.nonfinite import clear_stop, raise_if_stopped
from gentrain.spec import JobSpec, dump_yaml
from gentrain.timeline import mark
from gentrain.validation import ValidatedJob

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch
TRAIN_METRICS_ENV = "RAY_TRAIN_METRICS_ENABLED"  # Ray Train's Prometheus metrics
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller polls the workers
EMBEDDED_HEALTH_CHECK_S = "0.5"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API goes, before any auto-detection
DASHBOARD_ENV = "GENTRAIN_RAY_DASHBOARD"  # 1: the embedded Ray starts its dashboard


def dashboard_wanted() -> bool:
    """Whether the embedded Ray starts its dashboard ($GENTRAIN_RAY_DASHBOARD=1; off by default)."""
    return os.environ.get(DASHBOARD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class RunSummary:
    run_dir: str
    checkpoint: str | None
    mlflow_run_id: str | None
    mlflow_pointer: str | None
    samples: str | None
    metrics: dict
    trained: bool = True  # False: the checkpoint had reached train.steps already
    tracking_end: object | None = None  # a gentrain.tracking.Ending: what reached MLflow


class TrackingUnavailable(RuntimeError):
    pass


def prepare_data(spec: JobSpec) -> JobSpec:
    """Pack a `builtin:` source on the driver once, so workers never race to do it."""
    source = resolve_builtin(spec.data.source, default_cache_dir())
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, source=source))


def open_tracking(spec: JobSpec, previous_run_id: str | None, tags: dict | None = None):
    """(tracking URI, run id, tracking.Attempt) for this job; Nones when tracking is off.
    `tags`: more run tags (a sweep's trial: its parent run, gentrain.sweep.run)."""
    if not spec.tracking.enabled:
        return None, None, None
    from gentrain import tracking
    from gentrain.tracking.lineage import run_tags

    uri = tracking.resolve_tracking_uri(spec.tracking.uri)
    tracking.fail_fast_http()  # MLflow's default: 4 minutes of retries per call to a dead server
    # "Creating initial MLflow database tables..." on a new SQLite store is no news to the user.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    tags = {**run_tags(spec), **(tags or {})}  # outside: a failure here is not MLflow's
    try:
        run_id = tracking.open_run(uri, spec.tracking.experiment, run_name=spec.name,
                                   run_id=previous_run_id, tags=tags)
        tracking.log_params_flat(uri, run_id, spec.to_dict())
        import mlflow

        mlflow.MlflowClient(uri).log_text(run_id, dump_yaml(spec), "spec/resolved.yaml")
        attempt = tracking.begin_attempt(uri, run_id)
        spool = tracking.spool_dir_for(spec.run_dir)
        if spool:  # the run goes on: a status an earlier end could not set no longer applies
            tracking.clear_final_status(Path(spool) / run_id)
    except Exception as exc:  # noqa: BLE001 - any client failure means the same to the user
        raise TrackingUnavailable(
            f"tracking.uri: cannot reach MLflow at {uri} ({type(exc).__name__}: {exc}). "
            "Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run without "
            "tracking: tracking.enabled=false") from None
    _log_datasets(uri, run_id, spec)
    print(f"[gentrain] mlflow run: {run_id} | experiment: {spec.tracking.experiment} | "
          f"{tracking.run_url(uri, run_id)}", flush=True)  # `gentrain submit` reads this line
    return uri, run_id, attempt


def _log_datasets(uri: str, run_id: str, spec: JobSpec) -> None:
    """The splits as the run's dataset inputs; lineage is worth a warning, not the run."""
    try:
        import mlflow

        from gentrain.data.index import load_index
        from gentrain.tracking.lineage import log_datasets

        index = load_index(spec.data.source, allow_pipe=spec.data.allow_pipe)
        log_datasets(mlflow.MlflowClient(uri), run_id, spec, index)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not log the data sets of run {run_id} to MLflow: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def cluster_address() -> str | None:
    """$RAY_ADDRESS when it names a cluster to join; an http(s):// one is the Jobs API
    address that `gentrain submit` uses, so a local `gentrain run` stays embedded."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address if address and not address.startswith(("http://", "https://")) else None


def init_ray(spec: JobSpec) -> None:
    import ray

    from gentrain.launch import console

    if ray.is_initialized():
        return  # a Ray this process started already (tests run several runs on one)
    address = cluster_address()
    if address:
        ray.init(address=address)
        console.install()
        return
    # Embedded: never attach to another Ray on this machine by accident.
    # One node that is this machine: nothing can be preempted, and Ray Train's preemption
    # watcher would be one more process (2-4 s of a laptop's cores) per run. Nothing scrapes
    # Ray Train's Prometheus metrics without a dashboard either. Ray's workers inherit this
    # environment; a value the user set wins.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    os.environ.setdefault(TRAIN_METRICS_ENV, "0")
    # A worker's report (every checkpoint) returns when Ray Train's controller next polls
    # the workers: every 2 s by default, so a checkpoint cost up to 2 s of waiting. A poll
    # is a few milliseconds of a worker's time.
    os.environ.setdefault(HEALTH_CHECK_ENV, EMBEDDED_HEALTH_CHECK_S)
    cpus_per_worker = spec.scaling.resources_per_worker.get("CPU", 1)
    num_cpus = max(os.cpu_count() or 1, int(spec.scaling.num_workers * cpus_per_worker + 0.999))
    # Token auth guards this machine-local cluster too; saying so on every run is noise.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not dashboard_wanted():
        # No dashboard: its start competes with the workers' for the cores (the workers
        # started 0.8 s sooner than a plain script's with one, on 2 cores). Its one user, Ray Train's
        # placement-group cleaner, is left out with it (launch.trainer.GentrainTrainer).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
        console.install()
        return
    # GENTRAIN_RAY_DASHBOARD=1: the dashboard on, for a user who watches the run there.
    # Ray Train's state queries (the placement-group cleaner's) find their cluster by
    # auto-detection, which fails as soon as a second Ray runs on the machine; pin them to
    # this run's dashboard in every worker. Not RAY_ADDRESS: the driver would then join
    # that address on its next run in this process (cluster_address), and it is unknown
    # before ray.init.
    dashboard_port = _free_port()
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, logging_level="WARNING",
             runtime_env={"env_vars": {API_SERVER_ENV: f"http://127.0.0.1:{dashboard_port}"}})
    print(f"[gentrain] Ray dashboard: http://127.0.0.1:{dashboard_port}", flush=True)
    console.install()


def alongside(task, main):
    """`task()` in a thread while `main()` runs in this one; returns task's result, or
    raises its error once main is done (main's own error first)."""
    box: dict = {}

    def work():
        try:
            box["value"] = task()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="gentrain-alongside", daemon=True)
    thread.start()
    try:
        main()
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_log_dir() -> str | None:
    """The folder of this process's Ray session logs, when it started one."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - no public accessor
        return os.path.join(node.get_session_dir_path(), "logs") if node else None
    except Exception:  # noqa: BLE001 - only a pointer in an error message
        return None


def run(job: ValidatedJob, tags: dict | None = None, callbacks: tuple = (),
        report_evaluations: bool = False, failure_status=None) -> RunSummary:
    """Train a validated job (`gentrain.validation.load_job`) on the embedded Ray or the cluster.
    A sweep's trial (gentrain.sweep.trial) adds MLflow run `tags`, Ray Train `callbacks`,
    `report_evaluations` (launch.trainer.build_trainer) and `failure_status(run_id, status)`,
    the MLflow status a failed run ends with (a trial stopped early is KILLED, not FAILED)."""
    spec = job.spec
    # The same verified choice the workers make (gentrain.loop.restore), so this line and
    # the weights restored agree.
    choice = newest_good_checkpoint(spec.run_dir)
    for line in choice.rejection_lines():
        print(f"[gentrain] {line}", flush=True)
    previous = (choice.folder, choice.meta) if choice.folder else None
    # Decided before Ray and MLflow start. A sweep's trial trained to the end goes on: it still
    # reports that model's evaluation (Engine.fit), which Tune lost when the sweep was stopped.
    if previous and int(previous[1].get("step", 0)) >= spec.train.steps and not report_evaluations:
        return _nothing_to_do(spec, *previous)
    check_writable(spec.storage_path, spec.run_dir)  # full or read-only: refused before MLflow opens a run
    forget_ray_snapshot(spec.run_dir)  # why: gentrain.checkpoint.forget_ray_snapshot
    spec = prepare_data(spec)
    job = dataclasses.replace(job, spec=spec)
    previous_run_id = previous[1].get("mlflow_run_id") if previous else None
    if previous:
        print(continuing_message(spec, *previous), flush=True)
    from gentrain.launch.cluster_check import check_shared_paths

    mark("data_prepared")
    if cluster_address() is not None:  # a cluster: refuse paths some node lacks before an MLflow run is opened
        init_ray(spec)
        check_shared_paths(spec)
        uri, run_id, attempt = open_tracking(spec, previous_run_id, tags)
        # A job's working folder (Ray's unpacked working_dir) can be removed under its driver
        # while it trains; MLflow's client then fails at the end (os.getcwd: FileNotFoundError)
        # and the run stays RUNNING. Every path is absolute by now (storage, tracking URI).
        os.chdir(tempfile.gettempdir())
    else:
        # The embedded Ray starts while the MLflow run opens (both mostly wait: on Ray's
        # processes, on the tracking store); an unreachable MLflow still ends the run here.
        uri, run_id, attempt = alongside(lambda: open_tracking(spec, previous_run_id, tags),
                                         lambda: init_ray(spec))
        mark("ray_started")
        check_shared_paths(spec)  # a no-op on the embedded Ray's one node
    from gentrain import tracking
    from gentrain.launch.trainer import build_trainer
    from gentrain.tracking.relay import Relay

    pointer = tracking.run_url(uri, run_id) if run_id else None  # now, while the server is up
    spool = tracking.spool_dir_for(spec.run_dir)
    # On the embedded Ray, rank 0 hands its records to this process, which has MLflow
    # imported and the run open: the worker never imports MLflow (gentrain.tracking.relay).
    handoff = bool(run_id and spool and cluster_address() is None)
    trainer = build_trainer(job, run_id, uri, announced=tuple(choice.rejection_lines()),
                            run_started_ms=attempt.run_started_ms if attempt else None,
                            callbacks=callbacks, report_evaluations=report_evaluations,
                            handoff=handoff)
    clear_stop(spec.run_dir)
    mark("trainer_built")
    try:
        relay = Relay(uri, run_id, spool) if handoff else None
        try:
            with _sigterm_as_interrupt():
                result = trainer.fit()
        finally:
            if relay is not None:
                relay.close()  # sent or spooled, before end_run sends the spool
        mark("trainer_done")
        raise_if_stopped(spec.run_dir)  # a non-finite stop: the workers hand it over, not retried
    except BaseException:
        if run_id:  # bounded and never raising: the training error is the one to see
            tracking.end_attempt(uri, run_id, attempt, spool)
            status = "KILLED" if _interrupted() else "FAILED"
            if failure_status is not None:
                status = failure_status(run_id, status)
            ending = tracking.end_run(uri, run_id, status, spool)
            if not ending.marked:
                print(unsent_message(ending, spec.run_dir), file=sys.stderr, flush=True)
        raise
    if run_id:
        if spec.tracking.log_model:
            from gentrain.tracking.model import log_trained_model

            log_trained_model(uri, run_id, spec, result)
        tracking.end_attempt(uri, run_id, attempt, spool)
    ending = tracking.end_run(uri, run_id, "FINISHED", spool) if run_id else None
    return RunSummary(
        run_dir=spec.run_dir,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        mlflow_run_id=run_id,
        mlflow_pointer=pointer,
        samples=_latest_samples(spec),
        metrics=dict(result.metrics or {}),
        tracking_end=ending,
    )


def unsent_message(ending, run_dir: str) -> str:
    """Where a run's unsent MLflow records wait and the one command that sends them."""
    lines = [f"  mlflow      : unreachable at the end ({ending.error}); run {ending.run_id} "
             f"is left RUNNING there until the records are sent"]
    if ending.folder is None:  # remote storage: the worker spooled in its own temp folder
        lines.append(f"  final status: {ending.status}, not recorded (no local run folder)")
        return "\n".join(lines)
    lines.append(f"  unsent      : {ending.unsent} records and the final status "
                 f"{ending.status} in {ending.folder}")
    lines.append(f"  send them   : gentrain sync {run_dir}   (once MLflow is reachable)")
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """`gentrain stop` (Ray's job stop) sends SIGTERM: end like Ctrl-C, so the MLflow run is
    marked KILLED instead of being left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted() -> bool:
    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)


def continuing_message(spec: JobSpec, folder: Path, meta: dict) -> str:
    message = f"[gentrain] continuing {spec.name} from step {meta.get('step', '?')} ({folder})"
    if meta.get("mlflow_run_id") and spec.tracking.enabled:
        message += f" in MLflow run {meta['mlflow_run_id']}"
    changes = spec_changes(meta.get("spec"), spec.to_dict())
    if changes:
        message += "\n[gentrain] spec changed since that checkpoint: " + "; ".join(changes)
    return message


def _nothing_to_do(spec: JobSpec, folder: Path, meta: dict) -> RunSummary:
    step = int(meta["step"])
    if step == spec.train.steps:
        print(f"[gentrain] already trained {step} of {spec.train.steps} steps; nothing to do "
              f"({folder}). Raise train.steps to train on, or pick a new `name` to start fresh.")
    else:
        print(f"[gentrain] {spec.name} is already trained to step {step} ({folder}), past "
              f"train.steps={spec.train.steps}; nothing to do. To train a new model for "
              f"{spec.train.steps} steps pick a new `name` (e.g. name={spec.name}-{spec.train.steps}); "
              f"to train this one on, raise train.steps above {step}.")
    from gentrain.tracking.spool import spool_dir_for, spooled_runs

    spool = spool_dir_for(spec.run_dir)
    if spec.tracking.enabled and spool and spooled_runs(spool):
        print(f"[gentrain] MLflow has not received all of this run's records yet (the server "
              f"was away): send them with `gentrain sync {spec.run_dir}`")
    changes = spec_changes(meta.get("spec"), spec.to_dict(), ignore=("train.steps", "data.source"))
    if changes:
        print("[gentrain] not applied (the spec changed since that checkpoint): " + "; ".join(changes))
    run_id = meta.get("mlflow_run_id") if spec.tracking.enabled else None
    pointer = None
    if run_id:
        from gentrain import tracking

        pointer = tracking.run_url(tracking.resolve_tracking_uri(spec.tracking.uri), run_id)
    return RunSummary(run_dir=spec.run_dir, checkpoint=str(folder), mlflow_run_id=run_id,
                      mlflow_pointer=pointer, samples=_latest_samples(spec), metrics={}, trained=False)


def spec_changes(before: dict | None, after: dict, ignore: tuple[str, ...] = (), limit: int = 8) -> list[str]:
    """`path old -> new` for every field that differs between two spec dicts."""
    if not isinstance(before, dict):
        return []  # a checkpoint written before gentrain kept the spec in it
    old, new = _flatten(_with_todays_defaults(before)), _flatten(after)
    changed = [f"{key} {_short(old.get(key, '(unset)'))} -> {_short(new.get(key, '(unset)'))}"
               for key in sorted(set(old) | set(new))
               if old.get(key, _UNSET) != new.get(key, _UNSET) and not key.startswith(ignore)]
    if len(changed) > limit:
        changed = changed[:limit] + [f"and {len(changed) - limit} more"]
    return changed


_UNSET = object()


def _with_todays_defaults(saved: dict) -> dict:
    """A checkpoint's resolved spec read by this gentrain: fields added since it was written
    take their defaults, as the run's own spec did, so an upgrade alone lists no change
    (`job.config.leapfrog_steps (unset) -> 5`). A spec this gentrain no longer accepts is
    compared as it was written."""
    from gentrain.schema import SpecError
    from gentrain.validation import from_dict

    try:
        return from_dict(saved, "the checkpoint's spec").to_dict()
    except (SpecError, ValueError, TypeError):
        return saved


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _short(value, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _latest_samples(spec: JobSpec) -> str | None:
    folder = Path(spec.run_dir) / "samples"
    # image grids (step-N.png) or token samples as text (step-N.txt)
    grids = sorted([*folder.glob("step-*.png"), *folder.glob("step-*.txt")]) if folder.is_dir() else []
    return str(grids[-1]) if grids else None
