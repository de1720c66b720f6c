"""The driver: one MLflow run per job, then Ray Train on an embedded (or given) Ray.

    gentrain run vae/debug                     # embedded Ray: ray.init(address="local")
    RAY_ADDRESS=auto gentrain run vae/debug    # inside a cluster (what `submit` runs)

Running the same spec (same `name` and `storage_path`) again continues from the latest
checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from gentrain.checkpoint import latest_checkpoint
from gentrain.data.index import default_cache_dir, resolve_builtin
from gentrain.spec import JobSpec, dump_yaml

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch


@dataclass
class RunSummary:
    run_dir: str
    checkpoint: str | None
    mlflow_run_id: str | None
    mlflow_pointer: str | None
    samples: str | None
    metrics: dict


class TrackingUnavailable(RuntimeError):
    pass


def prepare_data(spec: JobSpec) -> JobSpec:
    """Pack a `builtin:` source on the driver once, so workers never race to do it."""
    source = resolve_builtin(spec.data.source, default_cache_dir())
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, source=source))


def open_tracking(spec: JobSpec, previous_run_id: str | None) -> tuple[str | None, str | None]:
    """(tracking URI, run id) for this job; (None, None) when tracking is off."""
    if not spec.tracking.enabled:
        return None, None
    from gentrain import tracking

    uri = tracking.resolve_tracking_uri(spec.tracking.uri)
    try:
        run_id = tracking.open_run(uri, spec.tracking.experiment, run_name=spec.name,
                                   run_id=previous_run_id,
                                   tags=_run_tags(spec))
        tracking.log_params_flat(uri, run_id, spec.to_dict())
        import mlflow

        mlflow.MlflowClient(uri).log_text(run_id, dump_yaml(spec), "spec/resolved.yaml")
    except Exception as exc:  # noqa: BLE001 - any client failure means the same to the user
        raise TrackingUnavailable(
            f"tracking.uri: cannot reach MLflow at {uri} ({type(exc).__name__}: {exc}). "
            "Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run without "
            "tracking: tracking.enabled=false") from None
    print(f"[gentrain] mlflow run: {run_id} | experiment: {spec.tracking.experiment} | "
          f"{tracking.run_url(uri, run_id)}", flush=True)  # `gentrain submit` reads this line
    return uri, run_id


def _run_tags(spec: JobSpec) -> dict:
    tags = {"gentrain.job_type": spec.job.type, "gentrain.run_dir": spec.run_dir}
    ray_job = os.environ.get("GENTRAIN_RAY_JOB_ID")  # set by `gentrain submit`
    if ray_job:
        tags["gentrain.ray_job_id"] = ray_job
    return tags


def cluster_address() -> str | None:
    """$RAY_ADDRESS when it names a cluster to join; an http(s):// one is the Jobs API
    address that `gentrain submit` uses, so a local `gentrain run` stays embedded."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address if address and not address.startswith(("http://", "https://")) else None


def init_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cluster_address()
    if address:
        ray.init(address=address)
        return
    # Embedded: never attach to another Ray on this machine by accident.
    # One node that is this machine: nothing can be preempted, and Ray Train's preemption
    # watcher would be one more process (2-4 s of a laptop's cores) per run. Ray's workers
    # inherit this environment; a value the user set wins.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    cpus_per_worker = spec.scaling.resources_per_worker.get("CPU", 1)
    num_cpus = max(os.cpu_count() or 1, int(spec.scaling.num_workers * cpus_per_worker + 0.999))
    # The dashboard stays on: without it Ray Train's state queries fail noisily.
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
             logging_level="WARNING")


def run(spec: JobSpec) -> RunSummary:
    spec = prepare_data(spec)
    previous = latest_checkpoint(spec.run_dir)
    previous_run_id = previous[1].get("mlflow_run_id") if previous else None
    if previous:
        print(f"[gentrain] continuing {spec.name} from {previous[0]}", flush=True)
    from gentrain.launch.cluster_check import check_shared_paths

    joined = cluster_address() is not None
    if joined:  # a cluster: refuse paths some node lacks before an MLflow run is opened
        init_ray(spec)
        check_shared_paths(spec)
    uri, run_id = open_tracking(spec, previous_run_id)
    if not joined:
        init_ray(spec)
        check_shared_paths(spec)  # a no-op on the embedded Ray's one node
    from gentrain import tracking
    from gentrain.launch.trainer import build_trainer

    trainer = build_trainer(spec, run_id, uri)
    try:
        with _sigterm_as_interrupt():
            result = trainer.fit()
    except BaseException:
        if run_id:
            tracking.finish_run(uri, run_id, "KILLED" if _interrupted() else "FAILED")
        raise
    if run_id:
        tracking.finish_run(uri, run_id, "FINISHED")
    return RunSummary(
        run_dir=spec.run_dir,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        mlflow_run_id=run_id,
        mlflow_pointer=tracking.run_url(uri, run_id) if run_id else None,
        samples=_latest_samples(spec),
        metrics=dict(result.metrics or {}),
    )


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


def _latest_samples(spec: JobSpec) -> str | None:
    folder = Path(spec.run_dir) / "samples"
    grids = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
    return str(grids[-1]) if grids else None
