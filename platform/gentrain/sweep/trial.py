"""One trial of a sweep, inside Ray Tune's trial actor: a whole `gentrain run` of its spec.

Ray Train V2 with Tune (Ray 2.60's way): the Tune function trainable builds and fits a
TorchTrainer (gentrain.launch.local.run, as `gentrain run` does, with the trial's own
workers); the workers report every evaluation to Ray Train (gentrain.loop.report_evaluation)
and EvaluationsToTune, a Ray Train callback, hands those reports to Ray Tune, where the
scheduler (ASHA) reads them. The trial's MLflow run is a child of the sweep's parent run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from gentrain.loop import EVALUATION_MARK
from gentrain.spec import set_path

SWEEP_TAG = "gentrain.sweep"  # the sweep's name, on the parent and every child run
ROLE_TAG = "gentrain.sweep.role"  # parent | trial
TRIAL_TAG = "gentrain.sweep.trial"  # the trial id, on its child run
OUTCOME_TAG = "gentrain.sweep.outcome"  # completed | stopped_early | failed
PARENT_TAG = "mlflow.parentRunId"  # what groups the children under the parent in MLflow's UI


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (handed to the trainable by tune.with_parameters)."""

    base: dict  # the spec mapping with the command's overrides; tracking.uri resolved on the driver
    source: str  # where the spec came from (for error messages)
    sweep: str  # the sweep's name
    sweep_dir: str  # <storage_path>/<sweep>: each trial's storage_path
    parent_run_id: str | None


def trial_data(base: dict, params: dict[str, Any], name: str | None = None,
               storage_path: str | None = None) -> dict:
    """The spec mapping of one trial: the base with each param's value set at its path."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_path(data, key.split("."), value)
    if name is not None:
        data["name"] = name
    if storage_path is not None:
        data["storage_path"] = storage_path
    return data


class EvaluationsToTune(TuneReportCallback):
    """Rank 0's evaluation reports to Ray Tune; the checkpoint reports (step only) stay with
    Ray Train: Tune requires the sweep's metric in every result it receives."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get(EVALUATION_MARK):
            super().after_report(run_context, metrics, None)


def run_trial(config: dict, context: TrialContext) -> None:
    """The Tune function trainable: validate the trial's spec (the checks `gentrain run`
    makes) and train it. A failure raises: Tune marks the trial failed, the sweep goes on."""
    from ray import tune

    from gentrain.launch.local import run
    from gentrain.validation import check_job

    trial_id = tune.get_context().get_trial_id()
    data = trial_data(context.base, config, name=trial_id, storage_path=context.sweep_dir)
    job = check_job(data, source=f"{context.source} (sweep {context.sweep}, trial {trial_id})")
    tags = {SWEEP_TAG: context.sweep, ROLE_TAG: "trial", TRIAL_TAG: trial_id}
    if context.parent_run_id:
        tags[PARENT_TAG] = context.parent_run_id
    run(job, tags=tags, callbacks=(EvaluationsToTune(),), report_evaluations=True,
        failure_status=lambda run_id, status: stopped_status(job.spec, run_id, status))


def stopped_status(spec, run_id: str, status: str) -> str:
    """KILLED for a trial the scheduler stopped (its training then fails as its actors go),
    FINISHED for one stopped at max_t after its last evaluation (while it finished up):
    the sweep's driver tags its run stopped_early before it marks it (ChildRuns), so
    whichever of the two ends the run last, it ends with that status."""
    try:
        import mlflow

        from gentrain.tracking import resolve_tracking_uri

        run = mlflow.MlflowClient(resolve_tracking_uri(spec.tracking.uri)).get_run(run_id)
        outcome = run.data.tags.get(OUTCOME_TAG)
        return {"stopped_early": "KILLED", "completed": "FINISHED"}.get(outcome, status)
    except Exception:  # noqa: BLE001 - the status as it would be without the sweep
        return status
