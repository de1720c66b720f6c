"""Evaluation during training (Engine.evaluate): held-out metrics, eval.metrics, sample grids.

At step 0, every eval.every steps and at the end, all ranks together:

- the job type's `evaluate` over up to eval.max_batches held-out batches per rank,
  weighted by batch size and all-reduced, plus the job type's `summarize` of those
  means (perplexity from the mean NLL) -> eval/<metric>;
- eval.metrics (FID, KID, ...) through evaluation/periodic.py (every rank samples a share);
- on rank 0, a grid of eval.num_samples samples into <run dir>/samples/step-N.png (token
  samples as text: step-N.txt) and
  the job type's visuals (reconstructions, traversals, ...) into samples/<name>/.

Under ZeRO-3 every network's weights are gathered for the whole block
(strategy.evaluation()), so a rank-0-only forward enters no collective.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gentrain.checkpoint import step_dir_name
from gentrain.paths import is_remote
from gentrain.data.pipeline import eval_batches
from gentrain.engine import to_device
from gentrain.evaluation.work import batch_generator
from gentrain.progress import metrics_line
from gentrain.registry import SampleRequest, batch_length
from gentrain.visual import save_image_grid, save_samples


class TrainingEvaluator:
    def __init__(self, engine):
        self.engine = engine
        self.spec = engine.spec
        self._periodic = None  # eval.metrics: built at the first evaluation (extractor, reference)

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        engine, spec = self.engine, self.spec
        metrics: dict[str, float] = {}
        with engine.strategy.evaluation() as modules:
            if engine.job.evaluate is not None:
                metrics.update(self._held_out(modules))
            if spec.eval.metrics:
                metrics.update(self._sample_metrics(modules))
            if engine.rank == 0:
                generator = torch.Generator().manual_seed(spec.train.seed)
                started = time.perf_counter()
                images = self._draw(modules)(spec.eval.num_samples, generator)
                self._log_sampling_rate(spec.eval.num_samples / max(time.perf_counter() - started, 1e-9))
                self._save_grid(images)
                self._log_sampler_rates(modules)
                if engine.job.visuals is not None:
                    self._save_visuals(modules, generator)
        return metrics

    def _held_out(self, modules) -> dict[str, float]:
        engine, spec = self.engine, self.spec
        sums: dict[str, float] = {}
        count = 0
        batches = eval_batches(engine.index, spec.data.eval_split, spec.train.batch_size,
                               engine.rank, engine.world_size, on_error=spec.data.on_error,
                               allow_pipe=spec.data.allow_pipe)
        for i, batch in enumerate(batches):
            if i >= spec.eval.max_batches:
                break
            batch = to_device(batch, engine.device)
            size = batch_length(batch)
            generator = batch_generator(spec.train.seed, i)
            for key, value in engine.job.evaluate(modules, engine.config, batch, generator).items():
                sums[key] = sums.get(key, 0.0) + value * size
            count += size
        keys = self._all_keys(sums)
        vector = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64)
        total = engine.strategy.all_reduce(vector, op="sum")
        if total[-1] == 0:
            return {}
        means = {k: float(v / total[-1]) for k, v in zip(keys, total[:-1])}
        if engine.job.summarize is not None:  # functions of the means (perplexity = exp(mean NLL))
            means.update(engine.job.summarize(means))
        metrics = {f"eval/{k}": v for k, v in means.items()}
        self._publish(metrics)
        return metrics

    def _sample_metrics(self, modules) -> dict[str, float]:
        """eval.metrics (FID, KID, ...): every rank samples and extracts its share (a collective)."""
        engine = self.engine
        if self._periodic is None:
            from gentrain.evaluation.periodic import PeriodicSampleMetrics

            self._periodic = PeriodicSampleMetrics(self.spec, engine.index, engine.rank, engine.world_size,
                                                   engine.device, engine.strategy.all_reduce)
        metrics = self._periodic(self._draw(modules), f"job type {engine.job.name!r} sample()")
        if metrics:
            self._publish(metrics)
            reference = self._periodic.reference
            if engine.logger and reference is not None and not self._periodic.reference_logged:
                engine.logger.log_artifact(str(reference.path), "eval/reference")
                self._periodic.reference_logged = True
        return metrics

    def _draw(self, modules):
        """(n, generator) -> the job type's samples from `modules`, under the spec's job.sampling."""
        engine = self.engine
        return lambda n, generator: engine.job.sample(modules, engine.config,
                                                      SampleRequest(n, generator, engine.sampler))

    def _log_sampling_rate(self, rate: float) -> None:
        """`sample/samples_per_second` of the grid's draw under the spec's job.sampling (rank 0,
        MLflow only): what a sampler setting (steps, MALA vs Langevin, ...) costs."""
        if self.engine.logger:
            self.engine.logger.log_metrics({"sample/samples_per_second": rate}, step=self.engine.step)

    def _log_sampler_rates(self, modules) -> None:
        """eval.sampler_rates: eval.num_samples drawn under each named setting, timed, logged as
        sample/<name>/samples_per_second (rank 0) and printed on one line."""
        engine, spec = self.engine, self.spec
        if not spec.eval.sampler_rates:
            return
        problems: list[str] = []
        rates = {}
        for name, settings in engine.job.rate_settings(spec, problems).items():
            generator = torch.Generator().manual_seed(spec.train.seed)
            started = time.perf_counter()
            engine.job.sample(modules, engine.config, SampleRequest(spec.eval.num_samples, generator, settings))
            rates[f"sample/{name}/samples_per_second"] = spec.eval.num_samples / max(
                time.perf_counter() - started, 1e-9)
        engine.print(f"sampling rates at step {engine.step} | " + " | ".join(
            f"{key.split('/')[1]} {rate:,.1f} samples/s" for key, rate in rates.items()))
        if engine.logger:
            engine.logger.log_metrics(rates, step=engine.step)

    def _publish(self, metrics: dict[str, float]) -> None:
        self.engine.print(metrics_line(f"eval at step {self.engine.step}", metrics,
                                       first=tuple(self.engine.job.likelihoods)))
        if self.engine.logger:
            self.engine.logger.log_metrics(metrics, step=self.engine.step)

    def _all_keys(self, sums: dict) -> list[str]:
        # Every rank must reduce the same keys, even one whose eval share was empty.
        if not torch.distributed.is_initialized():
            return sorted(sums)
        gathered: list = [None] * self.engine.world_size
        torch.distributed.all_gather_object(gathered, sorted(sums))
        return sorted(set().union(*gathered))

    def _save_grid(self, images: torch.Tensor, kind: str = "samples") -> Path:
        """A grid PNG into <run dir>/<kind>/step-N.png (token samples: step-N.txt), logged as
        an MLflow artifact."""
        if is_remote(self.spec.storage_path):
            folder = Path(tempfile.mkdtemp())
        else:
            folder = Path(self.spec.run_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{step_dir_name(self.engine.step)}.png"
        if kind == "samples" and self.engine.data_info.kind == "tokens":
            path = save_samples(images.detach().cpu(), path, self.engine.data_info)
        else:
            save_image_grid(images.detach().float().cpu(), path)
        if self.engine.logger:
            self.engine.logger.log_artifact(str(path), kind)
        return path

    def _save_visuals(self, modules, generator) -> None:
        """The job type's extra grids (reconstructions, latent traversals, ...) from a fixed
        held-out batch."""
        spec = self.spec
        batch = next(iter(eval_batches(self.engine.index, spec.data.eval_split, spec.eval.num_samples,
                                       0, 1, on_error=spec.data.on_error, allow_pipe=spec.data.allow_pipe)), None)
        if batch is None:
            return
        engine = self.engine
        for name, images in engine.job.visuals(modules, engine.config, to_device(batch, engine.device),
                                               generator).items():
            self._save_grid(images, f"samples/{name}")
