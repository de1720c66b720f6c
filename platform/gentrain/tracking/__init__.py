"""MLflow tracking: the driver owns one run, rank 0 logs into it, outages never stop training.

The driver opens (or continues) the run and records the resolved spec:

    uri = resolve_tracking_uri(spec.tracking.uri)
    run_id = open_run(uri, "vae-mnist", "debug", run_id=run_id_from_checkpoint)
    log_params_flat(uri, run_id, spec_as_dict)
    ...
    end_run(uri, run_id, "FINISHED", spool_dir_for(run_dir))  # bounded; see tracking.ending

Rank 0 logs through a RunLogger, whose calls only enqueue. A background thread sends,
retries while the server is away and spools to disk meanwhile, so tracking can neither
stall nor crash training; a later RunLogger for the same run sends what was spooled:

    run_logger = RunLogger(uri, run_id, spool_dir=run_dir / "mlflow-spool")
    run_logger.log_metrics({"loss": 0.31}, step=100)
    run_logger.close()

This module holds the driver's side; RunLogger lives in gentrain.tracking.logger and is
re-exported here. MLflow is imported where it is used, not here: a Ray Train worker that
hands its records to the driver (RunLogger(handoff=True)) never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gentrain.tracking._limits import _PARAM_VALUE_LIMIT, _PARAMS_PER_BATCH, _TAG_VALUE_LIMIT
from gentrain.tracking.ending import Ending as Ending, end_run as end_run  # re-exported
from gentrain.tracking.ending import sync_run as sync_run
from gentrain.tracking.logger import RunLogger as RunLogger  # re-exported: the public path
from gentrain.tracking.logger import fail_fast_http as fail_fast_http
from gentrain.tracking.lineage import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from gentrain.tracking.spool import PENDING_FILE, _Spool
from gentrain.tracking.spool import clear_final_status as clear_final_status
from gentrain.tracking.spool import spool_dir_for as spool_dir_for, spooled_runs as spooled_runs

if TYPE_CHECKING:
    from mlflow import MlflowClient

_log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
CHANGED_PARAM_TAG = "gentrain.changed_param."


@contextlib.contextmanager
def no_progress_bars():
    """MLflow's artifact progress bars off (they fill a run's log with carriage returns)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to `uri` for the calls inside (the fluent API,
    Model.log and download_artifacts read only that), then put back as it was, including
    $MLFLOW_TRACKING_URI: MLflow's own _use_tracking_uri unsets that variable on the way
    out, so a later default_tracking_uri() in the same process would fall back to ./mlflow.db."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set, else an absolute SQLite file ./mlflow.db."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    # Absolute: Ray workers run in another cwd and must open the same file.
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(spec_uri: str | None) -> str:
    """The spec's `tracking.uri` if given, else default_tracking_uri(); never one with secrets."""
    if spec_uri and spec_uri.strip():
        uri, source = spec_uri.strip(), "tracking.uri"
    else:
        uri, source = default_tracking_uri(), "MLFLOW_TRACKING_URI"
    _refuse_embedded_credentials(uri, source)
    return _absolute_sqlite_uri(uri)


def _refuse_embedded_credentials(uri: str, source: str) -> None:
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return
    # The URI is logged with the spec and shipped to every worker: a secret in it leaks.
    redacted = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
    if parts.scheme in ("http", "https"):
        fix = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
               "(or MLFLOW_TRACKING_TOKEN) in the environment instead")
    else:
        fix = "give the database its credentials through its own environment (e.g. PGPASSWORD)"
    raise ValueError(f"{source}: {redacted} embeds credentials in the URI; remove them and {fix}")


def _sqlite_path(uri: str) -> tuple[str, str] | None:
    """(path, query) of a file-backed SQLite URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path, separator, query = uri[len("sqlite:///"):].partition("?")
    if not path or path == ":memory:":
        return None
    return path, separator + query


def _absolute_sqlite_uri(uri: str) -> str:
    parsed = _sqlite_path(uri)
    if parsed is None or os.path.isabs(parsed[0]):
        return uri
    # A relative file would resolve against each Ray worker's own cwd: pin it here.
    return f"sqlite:///{Path.cwd() / parsed[0]}{parsed[1]}"


def _local_artifact_location(uri: str) -> str | None:
    parsed = _sqlite_path(uri)
    if parsed is None:
        return None
    # Beside the database, absolute: MLflow's default is relative to the process's cwd,
    # which would scatter artifacts into Ray workers' working folders.
    return (Path(parsed[0]).resolve().parent / "mlartifacts").as_uri()


def open_run(uri: str, experiment: str, run_name: str, run_id: str | None = None,
             tags: Mapping[str, Any] | None = None) -> str:
    """Continue `run_id` (status RUNNING again) if it exists, else start a new run; its id."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    local_db = _sqlite_path(uri)
    if local_db is not None:
        Path(local_db[0]).parent.mkdir(parents=True, exist_ok=True)  # SQLite makes no folders
    client = MlflowClient(tracking_uri=uri)
    tag_values = {str(key): str(value)[:_TAG_VALUE_LIMIT] for key, value in (tags or {}).items()}
    if run_id and _existing_run(client, uri, run_id):
        client.update_run(run_id, status="RUNNING")
        if tag_values:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tag_values.items()])
        return run_id
    experiment_id = _experiment_id(client, uri, experiment)
    return client.create_run(experiment_id, run_name=run_name, tags=tag_values).info.run_id


def _existing_run(client: MlflowClient, uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        _log.warning("run %s is not in %s; starting a new run instead", run_id, uri)
        return False
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"run {run_id} in {uri} was deleted: restore it with "
                         f"`mlflow runs restore --run-id {run_id}`, or start without its id")
    return True


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException as error:
            # Another driver may have created it between the lookup and the create.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"experiment {name!r} in {uri} was deleted: restore it with `mlflow experiments "
            f"restore --experiment-id {experiment.experiment_id}`, or choose another name")
    if not experiment.tags.get(EXPERIMENT_KIND_TAG):
        # MLflow 3's UI shows an untagged experiment in its GenAI view; a view chosen
        # in the UI (the same tag) is kept.
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def finish_run(uri: str, run_id: str, status: str) -> None:
    """Mark the run terminated with `status`: FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    if status not in RUN_STATUSES:
        raise ValueError(f"finish_run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status)


def flatten_params(nested: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"steps": 10}} -> {"train.steps": "10"}; values cut to MLflow's limit."""
    if is_dataclass(nested) and not isinstance(nested, type):
        nested = asdict(nested)
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:_PARAM_VALUE_LIMIT]
    return flat


def log_params_flat(uri: str, run_id: str, nested: Mapping[str, Any] | Any) -> None:
    """Log a nested dict (or dataclass) as dotted params, in batches.

    MLflow params are immutable, which matters on resume: a key already logged with the
    same value is skipped; a key logged with a different value keeps its original param,
    the new value is logged as tag `gentrain.changed_param.<key>`, and one warning names
    the changed keys.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data.params
    flat = flatten_params(nested)
    params = [Param(key, value) for key, value in flat.items() if key not in logged]
    changed = {key: value for key, value in flat.items() if key in logged and logged[key] != value}
    if changed:
        _log.warning("run %s already has different values for %s; params are immutable, so the "
                     "new values are logged as tags %s<key>", run_id,
                     ", ".join(f"{key} ({logged[key]!r} -> {value!r})" for key, value in
                               changed.items()), CHANGED_PARAM_TAG)
    tags = [RunTag(CHANGED_PARAM_TAG + key, value) for key, value in changed.items()]
    for start in range(0, max(len(params), len(tags)), _PARAMS_PER_BATCH):
        end = start + _PARAMS_PER_BATCH
        client.log_batch(run_id, params=params[start:end], tags=tags[start:end])


def run_url(uri: str, run_id: str) -> str:
    """Where a human finds the run: a UI link for servers, the `mlflow ui` command for SQLite."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        try:
            experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        except MlflowException:
            return f"{base} (run {run_id})"
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if scheme == "sqlite":
        return f"mlflow ui --backend-store-uri {uri}  (run {run_id})"
    return f"{uri} (run {run_id})"


ATTEMPTS_TAG = "gentrain.attempts"
ATTEMPT_METRIC = "run/attempt_seconds"
TOTAL_METRIC = "run/wall_seconds_total"


@dataclass
class Attempt:
    """This start of the run: its number (1 for a new run, 2 for its first rerun, ...),
    its wall-clock start and the seconds the earlier attempts took together."""
    number: int
    started: float
    earlier_seconds: float
    run_started_ms: int


def begin_attempt(uri: str, run_id: str) -> Attempt:
    """Count this start in the run's `gentrain.attempts` tag (the driver, at open)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    try:
        number = int(run.data.tags.get(ATTEMPTS_TAG, "0")) + 1
    except ValueError:
        number = 1
    client.set_tag(run_id, ATTEMPTS_TAG, str(number))
    return Attempt(number, time.time(), float(run.data.metrics.get(TOTAL_METRIC, 0.0)),
                   int(run.info.start_time or time.time() * 1000))


def end_attempt(uri: str, run_id: str, attempt: Attempt, spool_dir: str | None) -> None:
    """Log this attempt's wall time (`run/attempt_seconds` at step = attempt number) and the
    sum over attempts (`run/wall_seconds_total`): MLflow's run duration spans every rerun
    and the time between them. Through the spool folder that end_run sends next, so a
    server that is away loses nothing; never raises."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    seconds = time.time() - attempt.started
    now_ms = int(time.time() * 1000)
    items = [[ATTEMPT_METRIC, seconds, now_ms, attempt.number],
             [TOTAL_METRIC, attempt.earlier_seconds + seconds, now_ms, attempt.number]]
    try:
        if spool_dir is not None:
            _Spool(Path(spool_dir) / run_id / PENDING_FILE, uri).append(
                [{"op": "metrics", "items": items}])
            return
        MlflowClient(tracking_uri=uri).log_batch(
            run_id, metrics=[Metric(key, value, ts, step) for key, value, ts, step in items])
    except Exception as error:  # noqa: BLE001 - a duration is not worth failing a run for
        _log.warning("could not log the attempt's wall time for run %s: %s", run_id, error)
