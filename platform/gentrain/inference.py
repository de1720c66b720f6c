"""Load a trained job from a checkpoint for sampling, evaluation and scoring.

    gentrain sample runs/vae-debug --n 64 --out grid.png --set temperature=0.8
    gentrain score runs/vae-debug builtin:digits --out scores.csv

A reference is a checkpoint folder (`.../step-00000300`), a run folder
(`<storage_path>/<name>`: its latest complete checkpoint), an MLflow run id (the run's
`gentrain.run_dir` tag leads to the run folder) or an MLflow model URI that gentrain
logged (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/m-...`, `runs:/RUN_ID/model`:
its spec and weights are downloaded from $MLFLOW_TRACKING_URI). Networks come from the checkpoint's
`model.pt` (plain fp32 state_dicts, EMA weights where the job kept them), so loading
never needs the strategy, Ray or the number of workers that trained them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gentrain.checkpoint import MODEL_FILE, latest_checkpoint, read_meta
from gentrain.engine import build_modules
from gentrain.registry import DataInfo, JobType, SampleRequest, get_job_type, job_config, sampler_settings
from gentrain.spec import JobSpec, parse_spec


@dataclass
class Trained:
    spec: JobSpec
    job: JobType
    config: object
    modules: dict[str, torch.nn.Module]
    checkpoint: Path
    step: int
    mlflow_run_id: str | None
    sampler: object = None  # the job type's sampler settings (job.sampling, then --set)
    data_info: DataInfo | None = None

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`n` samples in data space, the same for the same seed (what `gentrain sample` draws)."""
        return self.draw(n, torch.Generator().manual_seed(seed), labels)

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.job.sample(self.modules, self.config, SampleRequest(n, generator, self.sampler, labels))

    @torch.no_grad()
    def evaluate(self, batch: dict, generator: torch.Generator) -> dict[str, float]:
        return self.job.evaluate(self.modules, self.config, batch, generator)


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def resolve_checkpoint(ref: str) -> Path:
    if ref.startswith(MODEL_URI_SCHEMES):
        return _checkpoint_from_mlflow_model(ref)
    path = Path(ref).expanduser()
    if path.is_dir() and read_meta(str(path)) is not None:
        return path
    if path.is_dir():
        found = latest_checkpoint(str(path))
        if found is None:
            raise FileNotFoundError(f"{ref}: a folder without finished checkpoints (step-N/ with "
                                    "gentrain.json); train first, or give a checkpoint folder")
        return found[0]
    run_dir = _run_dir_from_mlflow(ref)
    return resolve_checkpoint(run_dir)


def _run_dir_from_mlflow(run_id: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from gentrain.tracking import default_tracking_uri

    uri = default_tracking_uri()
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise FileNotFoundError(f"{run_id!r} is neither a checkpoint or run folder nor an MLflow "
                                f"run id known to {uri} (set MLFLOW_TRACKING_URI)") from None
    run_dir = run.data.tags.get("gentrain.run_dir")
    if not run_dir:
        raise FileNotFoundError(f"MLflow run {run_id} has no gentrain.run_dir tag; give its "
                                "checkpoint folder instead")
    return run_dir


def _checkpoint_from_mlflow_model(uri: str) -> Path:
    """Download a model gentrain logged (gentrain.tracking.model) into a temporary folder that
    lives as long as this process; its checkpoint folder (gentrain.json and model.pt)."""
    import atexit
    import shutil
    import tempfile

    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from gentrain.tracking import default_tracking_uri, no_progress_bars, using_tracking_uri

    tracking_uri = default_tracking_uri()
    folder = tempfile.mkdtemp(prefix="gentrain-mlflow-model-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    try:
        with using_tracking_uri(tracking_uri), no_progress_bars():
            local = Path(download_artifacts(artifact_uri=uri, dst_path=folder,
                                            tracking_uri=tracking_uri))
    except MlflowException as error:
        raise FileNotFoundError(f"{uri}: not found in MLflow at {tracking_uri} (set "
                                f"MLFLOW_TRACKING_URI): {str(error).splitlines()[0]}") from None
    checkpoint = local / "artifacts" / "checkpoint"
    if read_meta(str(checkpoint)) is None:
        raise FileNotFoundError(f"{uri} is not a model gentrain logged (no artifacts/checkpoint/"
                                "gentrain.json in it); give a gentrain run or checkpoint instead")
    return checkpoint


def load_trained(ref: str, device: str | torch.device = "cpu", use_ema: bool = True,
                 sampling: list[str] | None = None, config_changes: list[str] | None = None) -> Trained:
    """`sampling`: "key=value" changes to the spec's job.sampling (`gentrain sample --set`);
    `config_changes`: to its job.config's evaluation settings (`gentrain eval --config`)."""
    checkpoint = resolve_checkpoint(ref)
    meta = read_meta(str(checkpoint))
    model_path = checkpoint / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {MODEL_FILE}: it was written by an older "
                                "gentrain; resume training once to write a new checkpoint")
    # Validated when the run started: read back as it was, not judged by today's rules.
    spec = parse_spec(meta["spec"], source=f"{checkpoint}/gentrain.json")
    job = get_job_type(spec.job.type)
    config = job_config(spec, config_changes)
    sampler = sampler_settings(spec, sampling)
    data_info = DataInfo.from_dict(meta["data_info"])
    modules = build_modules(job, config, data_info, spec.train.seed)
    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    for name, module in modules.items():
        weights = saved["ema"].get(name) if use_ema else None
        module.load_state_dict(weights or saved["networks"][name])
        module.to(device).eval()
    return Trained(spec, job, config, modules, checkpoint, int(meta["step"]), meta.get("mlflow_run_id"),
                   sampler, data_info)
