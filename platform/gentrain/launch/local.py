"""The driver: one MLflow run per job, then Ray Train on an embedded (or given) Ray.

    gentrain run vae/debug                     # embedded Ray: ray.init(address="local")
    RAY_ADDRESS=auto gentrain run vae/debug    # inside a cluster (what `submit` runs)

Running the same spec (same `name` and `storage_path`) again continues from the latest
checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gentrain.checkpoint import latest_checkpoint
from gentrain.data.index import default_cache_dir, resolve_builtin
from gentrain.spec import JobSpec, dump_yaml


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
                                   tags={"gentrain.job_type": spec.job.type,
                                         "gentrain.run_dir": spec.run_dir})
        tracking.log_params_flat(uri, run_id, spec.to_dict())
        import mlflow

        mlflow.MlflowClient(uri).log_text(run_id, dump_yaml(spec), "spec/resolved.yaml")
    except Exception as exc:  # noqa: BLE001 - any client failure means the same to the user
        raise TrackingUnavailable(
            f"tracking.uri: cannot reach MLflow at {uri} ({type(exc).__name__}: {exc}). "
            "Start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or run without "
            "tracking: tracking.enabled=false") from None
    return uri, run_id


def init_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # Embedded: never attach to another Ray on this machine by accident.
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
    uri, run_id = open_tracking(spec, previous_run_id)
    init_ray(spec)
    from gentrain import tracking
    from gentrain.launch.trainer import build_trainer

    trainer = build_trainer(spec, run_id, uri)
    try:
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


def _interrupted() -> bool:
    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)


def _latest_samples(spec: JobSpec) -> str | None:
    folder = Path(spec.run_dir) / "samples"
    grids = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
    return str(grids[-1]) if grids else None
