"""Assemble Ray Train's TorchTrainer from a validated job: scaling, failure and checkpoint config.

The workers receive the ValidatedJob itself (the spec and the job type's config, checked
once here on the driver): they never validate again.
"""

from __future__ import annotations

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from gentrain.launch.failures import FailureReporter
from gentrain.launch.raystate import state_api_available
from gentrain.loop import train_loop_per_worker
from gentrain.spec import JobSpec
from gentrain.validation import ValidatedJob


class GentrainTrainer(TorchTrainer):
    """TorchTrainer without the components a Ray without a dashboard cannot use.

    Ray Train always starts a placement-group cleaner: a detached actor that asks the
    state API (the dashboard) every second whether the controller lives, to free the
    run's placement groups should it die without doing so. Without a dashboard (the
    embedded Ray of `gentrain run`) every query fails and is logged, and the cleaner can
    free nothing; the embedded Ray ends with the driver anyway. On a Ray with a dashboard
    (a cluster, GENTRAIN_RAY_DASHBOARD=1) nothing changes."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()  # Ray 2.60's (pinned in pyproject)
        if state_api_available():
            return callbacks
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        return [callback for callback in callbacks if not isinstance(callback, PlacementGroupCleanerCallback)]


def scaling_config(spec: JobSpec) -> ScalingConfig:
    resources = dict(spec.scaling.resources_per_worker) or None
    return ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                         resources_per_worker=resources)


def build_trainer(job: ValidatedJob, run_id: str | None, tracking_uri: str | None,
                  announced: tuple[str, ...] = (), run_started_ms: int | None = None,
                  callbacks: tuple = (), report_evaluations: bool = False,
                  handoff: bool = False) -> TorchTrainer:
    """`announced`: the checkpoint rejections the driver has printed already (the workers
    print the others: a folder cut short during this run). `callbacks`: more Ray Train
    callbacks; `report_evaluations`: every evaluation's metrics are reported to Ray Train
    too (a sweep's trial: gentrain.sweep.trial). `handoff`: rank 0 hands its MLflow records
    to the driver's Relay (gentrain.tracking.relay) instead of sending them itself."""
    spec = job.spec
    run_config = RunConfig(
        name=spec.name,
        storage_path=spec.storage_path,
        failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        callbacks=[FailureReporter(spec.checkpoint.max_failures), *callbacks],  # one line per restart
    )
    return GentrainTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "run_id": run_id, "tracking_uri": tracking_uri,
                           "announced": list(announced), "run_started_ms": run_started_ms,
                           "report_evaluations": report_evaluations, "tracking_handoff": handoff},
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(spec),
        run_config=run_config,
    )
