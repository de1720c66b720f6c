"""The Python API beside the CLI, for notebooks and scripts.

    import gentrain

    spec = gentrain.load("vae/debug", ["train.steps=40", "tracking.enabled=false"])
    summary = gentrain.run(spec)                 # as `gentrain run`: Ray Train, checkpoints, MLflow
    images = gentrain.open_run(summary.run_dir).sample(16, seed=0)

    engine = gentrain.Engine(spec)               # in this process, no Ray: world size 1
    engine.fit()

`open_run` takes what `gentrain sample` takes: a checkpoint folder, a run folder (its
latest complete checkpoint) or an MLflow run id.
"""

from __future__ import annotations

from typing import Sequence

from gentrain.engine import Engine
from gentrain.inference import Trained, load_trained
from gentrain.launch.local import RunSummary
from gentrain.launch.local import run as run_local
from gentrain.spec import JobSpec
from gentrain.validation import load_spec, validate

__all__ = ["Engine", "Trained", "load", "open_run", "run"]


def load(spec_ref: str, overrides: Sequence[str] = ()) -> JobSpec:
    """A validated spec from a bundled name (`vae/debug`) or a YAML path, with `a.b=c`
    overrides applied as on the command line."""
    return load_spec(spec_ref, list(overrides))


def run(spec: JobSpec) -> RunSummary:
    """Train `spec` as `gentrain run` does (embedded Ray unless RAY_ADDRESS names a cluster);
    continues from the latest checkpoint of the same name and storage_path. The spec is
    validated here, on the driver (it may have been changed since `load`); the workers
    receive what passed."""
    return run_local(validate(spec.to_dict(), source=spec.name))


def open_run(ref: str, device: str = "cpu", use_ema: bool = True) -> Trained:
    """A trained job's networks in eval mode (EMA weights where kept): `.sample(n, seed)`,
    `.modules`, `.spec`, `.step`."""
    return load_trained(ref, device=device, use_ema=use_ema)
