"""The trained model as an MLflow model: a pyfunc that draws samples.

    # the driver, at the end of a run (spec `tracking.log_model: true`)
    log_trained_model(uri, run_id, spec, result)

    # anyone, later, in any process where gentrain is importable (no Ray, no DeepSpeed):
    model = mlflow.pyfunc.load_model("models:/vae-digits/1")      # or runs:/<id>/model
    images = model.predict({"n": 16, "seed": 0})                  # numpy [16, 1, 8, 8]
    images = model.predict(pd.DataFrame({"n": [4], "seed": [3], "labels": [[0, 1, 2, 3]]}))
    scores = model.predict(pd.DataFrame({"data": list(x.reshape(len(x), -1))}))  # families with score

The model's artifacts are the final checkpoint's `gentrain.json` (the resolved spec, the
job type, the data's shape) and `model.pt` (fp32 weights, EMA where the job kept them):
what gentrain.inference.load_trained reads, so `predict` draws exactly what
`gentrain sample <run> --n N --seed S` draws. Its requirements pin gentrain and the
libraries inference imports at the versions gentrain pins; a plugin job type must be
installed too (its `gentrain.jobs` entry point; built-in families ship with gentrain).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

_log = logging.getLogger("gentrain.tracking")
MODEL_NAME = "model"  # runs:/<run id>/model
CHECKPOINT_ARTIFACT = "checkpoint"
# What loading and sampling import: gentrain's pins for these (not Ray, DeepSpeed, ...).
_INFERENCE_PACKAGES = ("torch", "numpy", "mlflow", "pyyaml", "pillow")


class GentrainModel(mlflow.pyfunc.PythonModel):
    """predict({"n": N, "seed": S, "labels": [...]}) -> samples [N, ...] as numpy, the
    same as `gentrain sample` for the same seed (rows are concatenated). Families with
    `score` also take rows of data, one flattened sample per row in column `data`
    (data space: [0, 1] pixels, token ids), and return a DataFrame of their per-sample
    scores (what `gentrain score` writes)."""

    def load_context(self, context):
        from gentrain.inference import load_trained

        self.trained = load_trained(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        rows = _rows(model_input)
        if rows and all(not _missing(row.get("data")) for row in rows):
            return self._score(rows)
        return self._sample(_requests(rows))

    def _sample(self, requests):
        import numpy as np
        import torch

        drawn = []
        for n, seed, labels in requests:
            if labels is not None and not self.trained.job.class_conditional:
                raise ValueError(f"job type {self.trained.job.name!r} draws no class-conditional "
                                 "samples: leave `labels` out")
            label_tensor = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
            drawn.append(self.trained.sample(n, seed=seed, labels=label_tensor).cpu().numpy())
        return drawn[0] if len(drawn) == 1 else np.concatenate(drawn)

    def _score(self, rows):
        import numpy as np
        import torch

        trained = self.trained
        if trained.job.score is None:
            raise ValueError(f"job type {trained.job.name!r} defines no score: give `n` (and "
                             "`seed`) to draw samples instead of `data`")
        info = trained.data_info
        flat = np.stack([np.asarray(row["data"]) for row in rows])
        size = int(np.prod(info.shape))
        if flat.shape[1] != size:
            raise ValueError(f"predict: each `data` row holds {flat.shape[1]} values; a sample "
                             f"of this model is {list(info.shape)} = {size} values")
        dtype = torch.int64 if info.kind == "tokens" else torch.float32
        device = next(next(iter(trained.modules.values())).parameters()).device
        batch = {info.input_key: torch.as_tensor(flat.reshape(len(rows), *info.shape)).to(dtype).to(device)}
        with torch.no_grad():
            scores = trained.job.score(trained.modules, trained.config, batch)
        return pd.DataFrame({name: value.detach().float().cpu().numpy() for name, value in sorted(scores.items())})


def _rows(model_input) -> list[dict]:
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    raise TypeError("predict takes a DataFrame or a dict: n, seed and optional labels to "
                    "draw samples; or data (one flattened sample per row) to score them")


def _requests(model_input) -> list[tuple[int, int, list | None]]:
    """(n, seed, labels) per row of a DataFrame, or of a dict of values."""
    rows = model_input if isinstance(model_input, list) else _rows(model_input)
    requests = []
    for row in rows:
        n = row.get("n")
        if n is None or _missing(n):
            raise ValueError("predict: `n` (the number of samples) is required")
        seed = row.get("seed")
        labels = row.get("labels")
        labels = None if labels is None or _missing(labels) else [int(label) for label in labels]
        if labels is not None and len(labels) != int(n):
            raise ValueError(f"predict: {len(labels)} labels for n={int(n)} samples")
        requests.append((int(n), 0 if seed is None or _missing(seed) else int(seed), labels))
    return requests


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN from a DataFrame's empty cell
    except (TypeError, ValueError):
        return False  # an array: present


def signature(trained):
    """Input n, seed (optional), labels (class-conditional families), data (families with
    `score`); output samples [-1, *data shape]: float32 in data space, int64 token ids
    (read from the data's description, not drawn: drawing costs seconds for some families)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec

    scores = trained.job.score is not None
    columns = [ColSpec(DataType.long, "n", required=not scores),
               ColSpec(DataType.long, "seed", required=False)]
    if trained.job.class_conditional:
        columns.append(ColSpec(Array(DataType.long), "labels", required=False))
    tokens = trained.data_info.kind == "tokens"
    if scores:  # one flattened sample per row, to score
        columns.append(ColSpec(Array(DataType.long if tokens else DataType.double), "data", required=False))
    output = TensorSpec(np.dtype(np.int64 if tokens else np.float32), (-1, *trained.data_info.shape))
    return ModelSignature(inputs=Schema(columns), outputs=Schema([output]))


def requirements() -> list[str]:
    """gentrain itself and the inference libraries, at gentrain's pins (else as installed)."""
    from gentrain import __version__

    pins = {}
    try:
        for requirement in metadata.requires("gentrain") or ():
            spec = requirement.split(";")[0].strip()
            name = spec.split("==")[0].split("[")[0].strip().lower()
            if "==" in spec and name in _INFERENCE_PACKAGES and "extra" not in requirement:
                pins[name] = f"{name}=={spec.split('==', 1)[1].strip()}"
    except metadata.PackageNotFoundError:
        pass
    for name in _INFERENCE_PACKAGES:
        if name not in pins:
            try:
                pins[name] = f"{name}=={metadata.version(name)}"
            except metadata.PackageNotFoundError:
                pass
    return [f"gentrain=={__version__}", *pins.values()]


def model_folder(checkpoint: str | Path, into: Path) -> Path:
    """The checkpoint's spec and weights only (not optimizer state or data positions)."""
    from gentrain.checkpoint import META_FILE, MODEL_FILE

    into.mkdir(parents=True, exist_ok=True)
    for name in (META_FILE, MODEL_FILE):
        shutil.copy2(Path(checkpoint) / name, into / name)
    return into


# Loaded by MLflow as "models from code" (no pickled object in the model).
_MODEL_CODE = """import mlflow.models

from gentrain.tracking.model import GentrainModel

mlflow.models.set_model(GentrainModel())
"""


def log_model_from_checkpoint(uri: str, run_id: str, checkpoint: str | Path,
                              register_as: str | None = None):
    """Log `checkpoint` as run `run_id`'s MLflow model (and register it); its ModelInfo."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    from gentrain.inference import load_trained
    from gentrain.tracking import no_progress_bars, using_tracking_uri

    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory(prefix="gentrain-model-") as scratch:
        folder = model_folder(checkpoint, Path(scratch) / CHECKPOINT_ARTIFACT)
        code = Path(scratch) / "gentrain_model.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        trained = load_trained(str(folder))
        tags = {"gentrain.job_type": trained.spec.job.type, "gentrain.step": str(trained.step)}
        # Created here, in the run's experiment: Model.log would put it in the process's
        # active experiment (the default one) instead.
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id,
                                            name=MODEL_NAME, source_run_id=run_id, tags=tags,
                                            model_type=trained.spec.job.type)
        try:
            with using_tracking_uri(uri), no_progress_bars(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                return Model.log(
                    None, mlflow.pyfunc, name=MODEL_NAME, run_id=run_id, model_id=logged.model_id,
                    step=trained.step, python_model=str(code),
                    artifacts={CHECKPOINT_ARTIFACT: str(folder)},
                    # No input_example: MLflow would load the model and draw samples to
                    # check it (seconds for some families); the signature says the same.
                    signature=signature(trained),
                    pip_requirements=requirements(), registered_model_name=register_as,
                    metadata={"gentrain_job_type": trained.spec.job.type, "gentrain_step": trained.step},
                )
        except BaseException:
            with contextlib.suppress(Exception):
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise


def log_trained_model(uri: str, run_id: str, spec, result=None) -> object | None:
    """The driver's call at the end of a run: never raises. A model that could not be logged
    is a warning; with a local run folder it is recorded in the run's spool folder and
    logged by the `gentrain sync` (or the end_run right after this) that reaches MLflow."""
    from gentrain.checkpoint import newest_good_checkpoint
    from gentrain.paths import is_remote
    from gentrain.tracking.spool import record_model, spool_dir_for

    started = time.monotonic()
    register_as = spec.tracking.register_model
    checkpoint = None
    try:
        if is_remote(spec.run_dir):
            if result is None or result.checkpoint is None:
                return None
            with result.checkpoint.as_directory() as directory:
                info = log_model_from_checkpoint(uri, run_id, directory, register_as)
        else:
            checkpoint = newest_good_checkpoint(spec.run_dir).folder
            if checkpoint is None:
                return None
            info = log_model_from_checkpoint(uri, run_id, checkpoint, register_as)
    except Exception as error:  # noqa: BLE001 - the training succeeded; say what is missing
        from gentrain.tracking.logger import short_reason as _reason

        spool = spool_dir_for(spec.run_dir)
        later = ""
        if checkpoint is not None and spool is not None:
            try:
                record_model(Path(spool) / run_id, str(checkpoint), register_as)
                later = f"; `gentrain sync {spec.run_dir}` logs it once MLflow is reachable"
            except OSError:
                pass
        print(f"warning: could not log the trained model to MLflow run {run_id} ({_reason(error)}); "
              f"its checkpoint is {checkpoint or spec.run_dir}{later}", file=sys.stderr, flush=True)
        return None
    registered = (f", registered as {register_as} version {info.registered_model_version}"
                  if register_as else "")
    print(f"[gentrain] mlflow model: {info.model_uri} (runs:/{run_id}/{MODEL_NAME}){registered} "
          f"in {time.monotonic() - started:.1f}s", flush=True)
    return info
