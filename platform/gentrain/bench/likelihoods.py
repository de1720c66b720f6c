"""PixelCNN's exact NLL, the VAE's IWAE bound and RealNVP's exact NLL on the same binarized
MNIST-5k, each trained for the same wall time; one table, a JSON file and an MLflow run.

    gentrain bench likelihoods --budget 60s --workers 1

Every family goes through the commands a user types: `gentrain run SPEC ...` (embedded Ray)
with train.max_time = the budget, then `gentrain eval RUN --metrics nll`. The specs are the
debug ones with the data, the budget and the binary likelihoods set (FAMILIES); what a
family reaches in the budget depends on the machine and its load, so the table says how
many steps each made. All three NLLs are in nats per binary image of the held-out split:
PixelCNN's and the flow's are exact (the flow's up to its dequantization bound, num_bits=1),
the VAE's is -IWAE, an upper bound, with -ELBO beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gentrain.bench.common import publish, timestamp

EXPERIMENT = "gentrain-bench"


@dataclass(frozen=True)
class Family:
    label: str
    spec: str
    overrides: tuple[str, ...]
    kind: str  # how the NLL relates to the true one


FAMILIES = (
    Family("pixelcnn", "pixelcnn/debug", ("job.config.head=bernoulli", "job.config.binarize=true"), "exact"),
    Family("vae", "vae/debug", ("job.config.likelihood=bernoulli",), "bound"),
    Family("realnvp", "flow/debug", ("job.config.architecture=realnvp", "job.config.num_bits=1"), "exact"),
)


def pack_binarized_mnist5k(out: Path) -> Path:
    """builtin:mnist5k's own train/test split with every pixel 0 or 255 (8-bit values >= 128
    are 1: PixelCNN's binarize and the flow's top bit agree on it); packed once."""
    if (out / "index.json").exists():
        return out
    from gentrain.data.pack import pack_source
    from gentrain.data.sources import open_source

    source = open_source("mnist5k")
    arrays = {}
    for split in ("train", "test"):
        rows = source.indices[split]
        arrays[f"x_{split}"] = np.where(source.data.images[rows] >= 128, 255, 0).astype(np.uint8)
        arrays[f"y_{split}"] = source.data.labels[rows]
    out.mkdir(parents=True, exist_ok=True)
    npz = out.parent / f"{out.name}.npz"
    np.savez(npz, **arrays)
    pack_source(str(npz), out, per_shard=1000, progress=False)
    npz.unlink()
    return out


def run_family(family: Family, data: str, storage: Path, budget: str, workers: int, tracking_uri: str | None,
               extra: list[str], eval_batches: int | None) -> dict:
    """`gentrain run` then `gentrain eval --metrics nll`, through the CLI's own code."""
    from gentrain.checkpoint import newest_good_checkpoint
    from gentrain.cli import main

    name = f"bench-{family.label}"
    overrides = [*family.overrides, f"name={name}", f"data.source={data}", f"storage_path={storage}",
                 f"train.max_time={budget}", "train.steps=1000000", "train.schedule.name=constant",
                 "train.log_every=10", "checkpoint.every=1000000", "eval.every=0", "eval.num_samples=16",
                 "eval.max_batches=2", f"scaling.num_workers={workers}", *extra]
    if tracking_uri:
        overrides.append(f"tracking.uri={tracking_uri}")
    print(f"[bench] gentrain run {family.spec} {' '.join(overrides)}", flush=True)
    started = time.monotonic()
    code = main(["run", family.spec, *overrides])
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"gentrain run {family.spec} exited with {code}")
    run_dir = storage / name
    meta = newest_good_checkpoint(str(run_dir)).meta
    report_path = storage / f"{name}-eval.json"
    args = ["eval", str(run_dir), "--metrics", "nll", "--out", str(report_path)]
    if eval_batches:
        args += ["--max-batches", str(eval_batches)]
    print(f"[bench] gentrain {' '.join(args)}", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the report is read back from --out
        code = main(args)
    if code != 0:
        raise RuntimeError(f"gentrain eval {run_dir} exited with {code}")
    report = json.loads(report_path.read_text())
    likelihood = report["likelihood"]
    return row(family, meta, wall, likelihood, report.get("mlflow_run_id"))


def row(family: Family, meta: dict, wall: float, likelihood: dict, mlflow_run_id: str | None) -> dict:
    """One table row from a run's checkpoint metadata and its eval report's likelihood part."""
    metrics = likelihood["metrics"]
    config = meta["spec"]["job"]["config"]
    if family.label == "vae":
        nll, measure = -metrics["iwae"], f"-IWAE (k={config.get('iwae_samples')})"
        extra = {"neg_elbo_nats": -metrics["elbo"]}
    else:
        nll, measure, extra = metrics["nll"], "NLL", {}
    return {"family": family.label, "spec": family.spec, "steps": int(meta["step"]),
            "stopped_at_time_budget": bool(meta.get("stopped_at_time_budget")), "run_seconds": round(wall, 1),
            "measure": measure, "nll_nats": nll, "unit": likelihood["units"].get("nll", "nats"),
            "kind": family.kind, "split": likelihood["split"], "num_samples": likelihood["num_samples"],
            "mlflow_run_id": mlflow_run_id, **extra}


def table(result: dict) -> str:
    lines = [f"likelihoods on {result['data']} (binarized MNIST-5k), train.max_time={result['budget']} each, "
             f"{result['workers']} worker(s); nats per image on the held-out split",
             f"{'family':<9} {'steps':>6} {'run s':>6}  {'measure':<14} {'nats':>8}  {'kind':<6} {'-ELBO':>8}"]
    for r in result["rows"]:
        elbo = f"{r['neg_elbo_nats']:8.2f}" if "neg_elbo_nats" in r else f"{'':>8}"
        lines.append(f"{r['family']:<9} {r['steps']:>6} {r['run_seconds']:>6.0f}  {r['measure']:<14} "
                     f"{r['nll_nats']:8.2f}  {r['kind']:<6} {elbo}")
    lines.append("run s: the whole `gentrain run` (Ray start, initial and final evaluation, checkpoint); "
                 "the budget counts from the first step. exact: the model's NLL (the flow's under uniform "
                 "dequantization); bound: an upper bound on it.")
    return "\n".join(lines)


def log_to_mlflow(result: dict, text: str, tracking_uri: str | None) -> str | None:
    """The table (text and JSON) as artifacts of one run of the gentrain-bench experiment, and
    each family's NLL, steps and run seconds as metrics; warns, never fails."""
    try:
        import mlflow

        from gentrain.tracking import open_run, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        # open_run creates the experiment as `gentrain run` does: with a local database, its
        # artifacts go beside it (mlartifacts/), not into ./mlruns of wherever this was started.
        run_id = open_run(uri, EXPERIMENT, "likelihoods",
                          tags={"gentrain.bench": "likelihoods", "gentrain.budget": str(result["budget"])})
        client = mlflow.MlflowClient(uri)
        for r in result["rows"]:
            for key in ("nll_nats", "steps", "run_seconds", "neg_elbo_nats"):
                if key in r:
                    client.log_metric(run_id, f"{r['family']}/{key}", float(r[key]))
        client.log_text(run_id, text + "\n", "likelihoods.txt")
        client.log_text(run_id, json.dumps(result, indent=2) + "\n", "likelihoods.json")
        client.set_terminated(run_id, "FINISHED")
        print(f"[bench] logged to MLflow run {run_id} (experiment {EXPERIMENT})", flush=True)
        return run_id
    except Exception as error:  # noqa: BLE001 - the table and JSON exist either way
        print(f"warning: could not log the table to MLflow: {error}", flush=True)
        return None


def run_likelihood_bench(budget: str = "60s", workers: int = 1, data: str | None = None,
                         storage: str | None = None, tracking_uri: str | None = None,
                         overrides: list[str] | None = None, eval_batches: int | None = None,
                         json_path: str | None = "bench-likelihoods.json") -> dict:
    """`overrides`: "FAMILY:key=value" (pixelcnn, vae or realnvp) added to that family's run."""
    from gentrain.spec import duration_problem

    problem = duration_problem(budget, "--budget")  # refused before anything is packed or trained
    if problem:
        raise ValueError(problem)
    labels = [family.label for family in FAMILIES]
    extra: dict[str, list[str]] = {label: [] for label in labels}
    for item in overrides or []:
        label, _, setting = item.partition(":")
        if label not in extra or "=" not in setting:
            raise ValueError(f"--set {item!r}: write FAMILY:key=value with FAMILY one of {', '.join(labels)}")
        extra[label].append(setting)
    root = Path(storage or f"runs/bench-likelihoods-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    if any((root / f"bench-{label}").exists() for label in labels):
        raise ValueError(f"--storage {root}: holds bench runs already (`gentrain run` would continue them); "
                         "give a new folder")
    source = data or str(pack_binarized_mnist5k(root / "data" / "mnist5k-binary"))
    rows = [run_family(family, source, root, budget, workers, tracking_uri, extra[family.label], eval_batches)
            for family in FAMILIES]
    result = {"bench": "likelihoods", "time": timestamp(), "data": source, "budget": budget,
              "workers": workers, "storage": str(root), "rows": rows}
    publish(result, table, json_path, print)
    result["mlflow_run_id"] = log_to_mlflow(result, table(result), tracking_uri)
    if json_path is not None:  # with the bench's own MLflow run id
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
