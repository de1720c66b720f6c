"""`gentrain eval`: the standard metrics of a trained run, logged into its MLflow run.

    gentrain eval runs/vae-debug --metrics fid,kid,is,pr,nll --extractor classifier:runs/classifier-debug
    gentrain eval runs/gan-cifar10 --metrics fid,kid,is --n 50000 --inception-weights ~/pt_inception-2015-12-05-6726825d.pth --workers 8

- Sample metrics (fid, kid, is, pr) compare `--n` samples of the job type's `sample`
  with the reference statistics of `--data` (default: the data the run trained on),
  split `--split` (default: its train split, as published FIDs do), computed once per
  (data content hash, split, extractor, sample count) and cached (metrics/reference.py).
  `--is-splits` (default 10), `--kid-subsets` (100) and `--kid-subset-size` (default
  min(1000, n // 2), below n so kid_std means something) set IS and KID; the report's
  `samples.settings` says what was used.
- nll: the likelihood metrics the job type declares (`JobType.likelihoods`: ELBO and IWAE
  bound in nats, bits/dim, bits/char, bits/byte, perplexity), from its `evaluate` averaged
  over the held-out split (`--eval-split`) and its `summarize` of those means (perplexity
  = exp(mean NLL)); the report's `likelihood.units` names each unit.
  heldout: everything its `evaluate` returns (a classifier's accuracy, a GAN's critic scores).

Results go to the run's MLflow run at the checkpoint's step: metrics
`eval/<extractor label>/<metric>` and `eval/<split>/<likelihood metric>`, the JSON
report as `eval/report-step-N.json` and the reference .npz under `eval/reference/`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gentrain.evaluation.distributed import DataWork, ExtractorChoice, GeneratedWork, summarize
from gentrain.evaluation.extractors import make_extractor
from gentrain.evaluation.work import data_units, generated_units, kept_rows
from gentrain.metrics.kid import check_kid_settings
from gentrain.metrics.reference import find_cached_reference, store_reference
from gentrain.metrics.settings import CLI_NAMES, MAX_KEPT_FEATURES, MetricSettings
from gentrain.metrics.summary import LOGGED_SETTINGS, REPORTED, SAMPLE_METRICS, summary_metrics

LIKELIHOOD_METRICS = ("nll", "heldout")
ALL_METRICS = SAMPLE_METRICS + LIKELIHOOD_METRICS


@dataclass
class EvalRequest:
    ref: str
    metrics: list[str]
    n: int = 10_000
    data: str | None = None
    split: str | None = None
    eval_split: str | None = None
    extractor: str = "inception"
    inception_weights: str | None = None
    workers: int = 1
    batch_size: int = 250
    seed: int = 0
    max_batches: int | None = None
    use_ema: bool = True
    out: str | None = None
    settings: MetricSettings = field(default_factory=MetricSettings)  # IS splits, KID subsets
    config_changes: list[str] = field(default_factory=list)  # job.config evaluation settings, "key=value"


def parse_metrics(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(names))


def evaluate_checkpoint(request: EvalRequest) -> dict:
    from gentrain.data.index import load_index
    from gentrain.inference import load_trained

    trained = load_trained(request.ref, use_ema=request.use_ema, config_changes=request.config_changes)
    spec = trained.spec
    index = load_index(request.data or spec.data.source, allow_pipe=spec.data.allow_pipe)
    sample_metrics = [m for m in request.metrics if m in SAMPLE_METRICS]
    likelihood_metrics = [m for m in request.metrics if m in LIKELIHOOD_METRICS]
    eval_split = request.eval_split or spec.data.eval_split
    _check_capabilities(trained, index, request.metrics, sample_metrics)
    report = {"run": spec.name, "job_type": spec.job.type, "checkpoint": str(trained.checkpoint),
              "step": trained.step, "mlflow_run_id": trained.mlflow_run_id, "data": index.location,
              "data_content_hash": index.content_hash, "time": time.time()}
    if request.config_changes:
        report["config_changes"] = list(request.config_changes)
    reference = None
    if likelihood_metrics:
        report["likelihood"] = {"split": eval_split, **heldout_metrics(
            trained, index, eval_split, likelihood_metrics, request.batch_size, request.max_batches,
            request.seed)}
    if sample_metrics:
        samples, reference = sample_report(trained, index, request, sample_metrics)
        report["samples"] = samples
    path = _write_report(report, request.out, trained.step)
    try:
        log_to_run(trained, report, path, reference)
    finally:  # the temporary copy only carries the report's MLflow name into the run
        shutil.rmtree(path.parent, ignore_errors=True)
    return report


def _check_capabilities(trained, index, metrics: list[str], sample_metrics: list[str]) -> None:
    """What the job type declares it can provide (JobType.generative, .likelihoods, .evaluate)."""
    job = trained.job
    generative = job.generative and index.kind == "image"
    likelihood = job.evaluate is not None and bool(job.likelihoods)
    can = ((list(SAMPLE_METRICS) if generative else []) + (["nll"] if likelihood else [])
           + (["heldout"] if job.evaluate else []))
    missing = [m for m in metrics if m not in can]
    if missing:
        why = []
        if not generative and sample_metrics:
            why.append("sample metrics need image samples of a generative model"
                       + ("" if job.generative else " (its samples are not draws of the data, e.g. a "
                          "classifier's class visualisations)"))
        if job.evaluate is None and set(missing) & set(LIKELIHOOD_METRICS):
            why.append("the job type defines no evaluate()")
        elif "nll" in missing:
            why.append("it declares no likelihood metrics (JobType.likelihoods)")
        raise ValueError(f"job type {job.name!r} cannot provide {', '.join(missing)} ({'; '.join(why)}); "
                         f"it can provide: {', '.join(can) or 'nothing gentrain eval measures'}")


@torch.no_grad()
def heldout_metrics(trained, index, split: str, metrics: list[str], batch_size: int,
                    max_batches: int | None, seed: int = 0) -> dict:
    """Per-sample means of the job type's evaluate over the split: its declared likelihoods
    (with their units), and everything else too when `heldout` is asked for."""
    from gentrain.data.pipeline import eval_batches
    from gentrain.evaluation.work import batch_generator
    from gentrain.registry import batch_length

    sums: dict[str, float] = {}
    count = 0
    for number, batch in enumerate(eval_batches(index, split, batch_size, 0, 1, allow_pipe=index.trusted)):
        if max_batches is not None and number >= max_batches:
            break
        size = batch_length(batch)
        for key, value in trained.evaluate(batch, batch_generator(seed, number)).items():
            sums[key] = sums.get(key, 0.0) + float(value) * size
        count += size
    if not count:
        raise ValueError(f"split {split!r} of {index.location} gave no batches to evaluate")
    means = {key: value / count for key, value in sorted(sums.items())}
    if trained.job.summarize is not None:  # functions of the means (perplexity = exp(mean NLL))
        means = dict(sorted({**means, **trained.job.summarize(means)}.items()))
    likelihoods = trained.job.likelihoods
    if "heldout" not in metrics:
        means = {key: value for key, value in means.items() if key in likelihoods}
    print(f"[gentrain] {split}: " + " | ".join(f"{k} {v:.4f}" for k, v in means.items()), file=sys.stderr)
    return {"num_samples": count, "metrics": means,
            "units": {key: likelihoods[key] for key in means if key in likelihoods}}


def sample_report(trained, index, request: EvalRequest, metrics: list[str]):
    split = request.split or trained.spec.data.train_split
    shape = tuple(index.shape)
    choice = ExtractorChoice(request.extractor, request.inception_weights, shape)
    extractor = make_extractor(choice.choice, choice.inception_weights, expected_shape=shape)
    reference = reference_statistics(index, split, request.n, extractor, choice, request.workers,
                                     request.batch_size)
    if "kid" in metrics:  # before sampling: the reference may hold fewer images than --n
        check_kid_settings(request.settings.kid_subsets, request.settings.kid_subset_size,
                           reference.features.shape[0], min(request.n, MAX_KEPT_FEATURES), CLI_NAMES)
    units = generated_units(request.n, request.batch_size)
    work = GeneratedWork(str(trained.checkpoint), request.use_ema, request.seed, request.n,
                         request.settings.is_splits)
    fake = summarize(work, choice, units, request.workers, local=(trained, extractor))
    report = summary_metrics(reference, fake, metrics, extractor_name=extractor.name, settings=request.settings)
    report.update(extractor_label=extractor.label, reference_split=split, reference_file=reference.path.name,
                  reference_from_cache=reference.from_cache, seed=request.seed)
    print("[gentrain] " + " | ".join(f"{k} {report[k]:.4f}" for k in REPORTED if k in report)
          + f" ({extractor.name}, {report['num_fake']} samples vs {report['num_real']} {split} images)",
          file=sys.stderr)
    return report, reference


def reference_statistics(index, split: str, n: int, extractor, choice: ExtractorChoice, workers: int,
                         batch_size: int):
    """The split's statistics under `extractor`: from the cache, or computed (in parallel) and cached."""
    total = min(n, index.total(split))
    cached = find_cached_reference(extractor.name, content_hash=index.content_hash, split=split, num_samples=total)
    if cached is not None:
        return cached
    work = DataWork(index.location, split, total, batch_size, index.trusted)
    summary = summarize(work, choice, data_units(index, split, total), workers, local=(None, extractor))
    if summary.count != total:
        raise ValueError(f"reference: read {summary.count} of the {total} samples of split {split!r}")
    return store_reference(summary.statistics, summary.kept_features(), extractor.name,
                           content_hash=index.content_hash, split=split, num_samples=total)


def _write_report(report: dict, out: str | None, step: int) -> Path:
    """The report under its MLflow name (report-step-N.json), and at `out` when asked for."""
    text = json.dumps(report, indent=2, default=_plain)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    path = Path(tempfile.mkdtemp(prefix="gentrain-eval-")) / f"report-step-{step:08d}.json"
    path.write_text(text)
    return path


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def metric_values(report: dict) -> dict[str, float]:
    """The MLflow metrics of a report: eval/<extractor label>/<metric> and eval/<split>/<likelihood key>."""
    values = {}
    samples = report.get("samples")
    if samples:
        values.update({f"eval/{samples['extractor_label']}/{key}": float(samples[key])
                       for key in REPORTED + LOGGED_SETTINGS if key in samples})
    likelihood = report.get("likelihood")
    if likelihood:
        values.update({f"eval/{likelihood['split']}/{key}": float(value)
                       for key, value in likelihood["metrics"].items()})
    return values


def log_to_run(trained, report: dict, report_path: Path, reference) -> None:
    """Metrics at the checkpoint's step, the report and the reference file; warns, never fails."""
    if not trained.mlflow_run_id or not trained.spec.tracking.enabled:
        print("[gentrain] not logged to MLflow: the run has no MLflow run (tracking disabled)", file=sys.stderr)
        return
    try:
        import mlflow
        from mlflow.entities import Metric

        from gentrain.tracking import resolve_tracking_uri

        client = mlflow.MlflowClient(resolve_tracking_uri(trained.spec.tracking.uri))
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, trained.step) for key, value in metric_values(report).items()]
        client.log_batch(trained.mlflow_run_id, metrics=metrics)
        client.log_artifact(trained.mlflow_run_id, str(report_path), "eval")
        if reference is not None:
            client.log_artifact(trained.mlflow_run_id, str(reference.path), "eval/reference")
        if report.get("samples"):
            client.set_tag(trained.mlflow_run_id, f"gentrain.extractor.{report['samples']['extractor_label']}",
                           report["samples"]["extractor"])
        print(f"[gentrain] logged {len(metrics)} metrics at step {trained.step} and the report to MLflow run "
              f"{trained.mlflow_run_id} (eval/)", file=sys.stderr)
    except Exception as error:  # noqa: BLE001 - the report file exists either way
        print(f"warning: could not log the evaluation to MLflow run {trained.mlflow_run_id}: {error}",
              file=sys.stderr)
