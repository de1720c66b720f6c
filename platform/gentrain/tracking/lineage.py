"""What a run is, for MLflow's filters: tags, the data it read, the experiment's view.

    tags = run_tags(spec)                       # driver, before open_run
    log_datasets(client, run_id, spec, index)   # once per run: a rerun adds nothing

Tags (searchable: `tags.gentrain.strategy = 'deepspeed'`): gentrain's version, the git
commit of the working directory (`mlflow.source.git.commit`, the one MLflow's UI shows)
with `gentrain.git.dirty`, the job type, strategy / ZeRO stage / precision, world size
and the launcher: `local` (an embedded Ray), `ray-cluster` (RAY_ADDRESS) or `ray-job`
(`gentrain submit`, with `gentrain.ray_job_id`). A job submitted from a git checkout
carries the submitting machine's commit (GIT_COMMIT_ENV): the cluster's copy of the
working folder has no .git.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from typing import Any

# Set by `gentrain submit` from the machine it runs on (gentrain.launch.remote.job_env).
GIT_COMMIT_ENV = "GENTRAIN_GIT_COMMIT"
GIT_DIRTY_ENV = "GENTRAIN_GIT_DIRTY"
RAY_JOB_ENV = "GENTRAIN_RAY_JOB_ID"
# The experiment tag MLflow 3's UI reads (set by gentrain.tracking._experiment_id) to choose its view: "custom_model_development" is
# the model-training view (runs, charts); without it an experiment may be shown as GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The MLflow dataset digest column holds at most 36 characters.
_DIGEST_CHARS = 36


def git_state(folder: str | os.PathLike | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git working tree holding `folder` (default: cwd); None when
    it is not in one or git is missing. Dirty: tracked files differ from the commit."""
    try:  # getcwd fails where the folder was removed under the process (a Ray job's working_dir)
        cwd = os.fspath(folder) if folder is not None else os.getcwd()
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip(), bool(status.stdout.strip()) or status.returncode != 0


def git_env(folder: str | os.PathLike | None = None) -> dict[str, str]:
    """What `gentrain submit` hands the job so its run carries this checkout's commit."""
    state = git_state(folder)
    if state is None:
        return {}
    return {GIT_COMMIT_ENV: state[0], GIT_DIRTY_ENV: "true" if state[1] else "false"}


def launcher() -> tuple[str, str | None]:
    """("local" | "ray-cluster" | "ray-job", the Ray job id when submitted)."""
    job_id = os.environ.get(RAY_JOB_ENV, "").strip()
    if job_id:
        return "ray-job", job_id
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and not address.startswith(("http://", "https://")):
        return "ray-cluster", None
    return "local", None


def run_tags(spec) -> dict[str, str]:
    """The tags every run carries (set again on a rerun: the newest attempt's values)."""
    from gentrain import __version__

    tags = {
        "gentrain.version": __version__,
        "gentrain.job_type": spec.job.type,
        "gentrain.run_dir": spec.run_dir,
        "gentrain.strategy": spec.strategy.name,
        "gentrain.precision": spec.strategy.precision,
        "gentrain.world_size": str(spec.scaling.num_workers),
        "gentrain.use_gpu": str(spec.scaling.use_gpu).lower(),
        "mlflow.source.name": "gentrain run",
        "mlflow.source.type": "JOB",
    }
    if spec.strategy.name == "deepspeed":
        tags["gentrain.zero_stage"] = str(spec.strategy.zero_stage)
    name, job_id = launcher()
    tags["gentrain.launcher"] = name
    if job_id:
        tags["gentrain.ray_job_id"] = job_id
    commit = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if commit:
        dirty = os.environ.get(GIT_DIRTY_ENV, "").strip().lower() == "true"
    else:
        state = git_state()
        commit, dirty = state if state else ("", False)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["gentrain.git.dirty"] = "true" if dirty else "false"
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in a container without a passwd entry
        pass
    return tags


def dataset_entities(spec, index) -> list:
    """The training and evaluation splits as MLflow DatasetInputs (context training /
    evaluation); digest: the index's content hash (cut to MLflow's 36 characters; the
    whole hash is in the profile), so two runs on different data are told apart."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for split, context in ((spec.data.train_split, "training"), (spec.data.eval_split, "evaluation")):
        if split not in index.splits:
            continue
        info = index.splits[split]
        name = f"{_data_name(index)}/{split}"
        profile = {"samples": info.total, "shards": len(info.shards), "split": split,
                   "content_hash": index.content_hash, "kind": index.kind,
                   "num_classes": index.num_classes}
        schema = {"shape": list(index.shape), "kind": index.kind,
                  "class_names": list(index.class_names)[:100]}
        if index.vocab_size:
            schema["vocab_size"] = index.vocab_size
        dataset = Dataset(name=name[:500], digest=dataset_digest(index.content_hash),
                          source_type=_source_type(index.location),
                          source=json.dumps({"uri": index.location, "split": split,
                                             "spec_source": spec.data.source}),
                          schema=json.dumps(schema), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def dataset_digest(content_hash: str) -> str:
    """The hash without its algorithm prefix ("sha256:"), cut to MLflow's 36 characters."""
    return content_hash.rpartition(":")[2][:_DIGEST_CHARS]


def log_datasets(client, run_id: str, spec, index) -> int:
    """Log the splits not yet among the run's inputs (a rerun of the same run on the same
    data logs nothing); how many were logged."""
    have = {(item.dataset.name, item.dataset.digest, _context(item.tags))
            for item in client.get_run(run_id).inputs.dataset_inputs}
    new = [item for item in dataset_entities(spec, index)
           if (item.dataset.name, item.dataset.digest, _context(item.tags)) not in have]
    if new:
        client.log_inputs(run_id, datasets=new)
    return len(new)


def _context(tags: Any) -> str | None:
    for tag in tags or ():
        if tag.key == "mlflow.data.context":
            return tag.value
    return None


def _data_name(index) -> str:
    """The packed set's own name (`digits`), else its folder's."""
    return index.source or os.path.basename(index.location.rstrip("/")) or index.location


def _source_type(location: str) -> str:
    scheme = location.split("://", 1)[0] if "://" in location else ""
    return {"s3": "s3", "gs": "gcs", "http": "http", "https": "http"}.get(scheme, "local")

