"""A sweep in MLflow: the parent run (search space, results, best spec) and ChildRuns, the
Ray Tune callback that records each trial's outcome on its child run (gentrain.sweep.run)."""

from __future__ import annotations

import math
import sys
import time

from ray.tune import Callback

from gentrain.loop import EVALUATION_MARK
from gentrain.spec import JobSpec, dump_yaml
from gentrain.sweep.results import TrialRow, params_text, value_text
from gentrain.sweep.space import SweepParam
from gentrain.sweep.trial import OUTCOME_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG


def open_parent(spec: JobSpec, name: str, sweep_dir: str, request,
                space: list[SweepParam], base: dict) -> tuple[str | None, str | None]:
    """(tracking URI, parent run id) of the sweep (None, None without tracking): a new run, or
    on --resume the sweep's earlier parent. `request`: the gentrain.sweep.run.SweepRequest."""
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


def end_parent(uri: str, run_id: str, status: str) -> None:
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
        print(f"[gentrain] trial {trial.trial_id} started: {params_text(trial.config)}", flush=True)

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
              f" ({self.metric} {value_text(value)})", flush=True)
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
            # A completed trial too: Tune stops a trial at max_t as soon as its last evaluation
            # is reported, which can end its run FAILED while it finishes up (model logging).
            if run.info.status == "RUNNING" or (outcome in ("stopped_early", "interrupted", "completed")
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


def log_results(uri: str, parent: str, texts: dict, best: TrialRow | None, metric: str) -> str | None:
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
    end_parent(uri, parent, "FINISHED")
    return pointer
