"""The per-worker training loop that Ray Train runs on every rank.

    batch -> job.train_step(ctx, batch) -> metrics
    every train.log_every steps: all-reduce metrics, rank 0 prints and logs to MLflow
    every checkpoint.every steps and at the end: save, ray.train.report(checkpoint=...)
    every eval.every steps, at step 0 and at the end: held-out metrics and a sample grid

The job type owns what happens inside a step; this file owns when things happen.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import ray.train
import torch

from gentrain.checkpoint import MODEL_FILE, read_meta, step_dir_name, write_meta
from gentrain.context import StepContext
from gentrain.data.augment import Augmentation
from gentrain.data.index import load_index
from gentrain.data.pipeline import batches_per_epoch, eval_batches, train_batches
from gentrain.launch.console import route_worker_logs, worker_print
from gentrain.registry import DataInfo, get_job_type
from gentrain.spec import JobSpec, from_dict, job_config
from gentrain.strategies import make_strategy
from gentrain.strategies.base import make_optimizer
from gentrain.visual import save_image_grid


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ray.train.torch.TorchTrainer (config from launch.trainer)."""
    route_worker_logs()
    worker = Worker(from_dict(config["spec"]), config.get("run_id"), config.get("tracking_uri"))
    try:
        worker.run()
    finally:
        worker.close()


class Worker:
    def __init__(self, spec: JobSpec, run_id: str | None, tracking_uri: str | None):
        if not spec.scaling.use_gpu:
            # DeepSpeed picks its accelerator when first imported; say CPU before it guesses.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        context = ray.train.get_context()
        self.spec = spec
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
        self.run_id = run_id
        self.logger = None
        if self.rank == 0 and run_id and tracking_uri:
            from gentrain.tracking import RunLogger

            spool = None if "://" in spec.storage_path else os.path.join(spec.run_dir, "mlflow-spool")
            self.logger = RunLogger(tracking_uri, run_id, spool_dir=spool)
        self.index = load_index(spec.data.source, allow_pipe=spec.data.allow_pipe)
        self.job = get_job_type(spec.job.type)
        self.config = job_config(spec)
        torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
        modules = self.job.build(self.config, DataInfo(tuple(self.index.shape), self.index.num_classes))
        if spec.strategy.grad_checkpointing:
            for module in modules.values():
                if hasattr(module, "enable_grad_checkpointing"):
                    module.enable_grad_checkpointing(True)
        self.strategy = make_strategy(spec, self.device)
        self.strategy.setup(modules, self._optimizers(modules))
        self.ctx = StepContext(self.strategy, self.config, spec.train.steps)
        self.step = 0
        self.batches_consumed = 0
        self.train_data = None  # the train_batches iterator: its skipped_samples feed data/skipped_samples
        self.skipped_before = 0  # data/skipped_samples at the checkpoint this run resumed from
        self._periodic = None  # eval.metrics: built at the first evaluation (extractor, reference)

    def _optimizers(self, modules):
        section = self.spec.train.optimizer
        if self.job.optimizers is not None:
            def build(params, lr=None, betas=None):  # the spec's optimizer, per-network lr/betas
                changes = {k: v for k, v in (("lr", lr), ("betas", betas)) if v is not None}
                return make_optimizer(params, dataclasses.replace(section, **changes))

            return self.job.optimizers(self.config, modules, build)
        return {name: make_optimizer(module.parameters(), section)
                for name, module in modules.items() if any(True for _ in module.parameters())}

    # -- resume -------------------------------------------------------------------
    def restore(self) -> bool:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            self.strategy.load(directory)
            meta = read_meta(directory) or {}
        self.step = int(meta.get("step", 0))
        self.batches_consumed = int(meta.get("batches_consumed", 0))
        self.skipped_before = int(meta.get("skipped_samples", 0))
        self._print(f"resumed from step {self.step} ({checkpoint.path})")
        return True

    # -- the loop -----------------------------------------------------------------
    def run(self) -> None:
        spec = self.spec
        resumed = self.restore()
        if self.step >= spec.train.steps:
            self._print(f"already trained {self.step} of {spec.train.steps} steps; nothing to do")
            return
        if not resumed:
            self.evaluate()
        batches = self._train_batches()
        window = _Window()
        while self.step < spec.train.steps:
            metrics = self._optimizer_step(batches)
            self.step += 1
            window.add(metrics)
            if self.step % spec.train.log_every == 0 or self.step == spec.train.steps:
                self._log_window(window)
                window = _Window()
            if spec.eval.every and self.step % spec.eval.every == 0 and self.step != spec.train.steps:
                self.evaluate()
            if self.step % spec.checkpoint.every == 0 or self.step == spec.train.steps:
                self.save_checkpoint()
        self.evaluate()

    def _train_batches(self):
        data = self.spec.data
        epoch_samples = data.epoch_samples if data.resampled else None
        per_epoch = batches_per_epoch(self.index, data.train_split, self.spec.train.batch_size,
                                      self.world_size, epoch_samples=epoch_samples)
        epoch, skip = divmod(self.batches_consumed, per_epoch)
        self.train_data = train_batches(
            self.index, data.train_split, self.spec.train.batch_size, self.rank, self.world_size,
            self.spec.train.seed, loader_workers=data.loader_workers, shuffle_buffer=data.shuffle_buffer,
            start_epoch=epoch, start_batch=skip,  # continue mid-epoch where the checkpoint stopped
            augment=Augmentation(flip=data.augment.flip, crop_padding=data.augment.crop_padding),
            resampled=data.resampled, epoch_samples=data.epoch_samples, on_error=data.on_error,
            allow_pipe=data.allow_pipe)
        return self.train_data

    def _skipped_samples(self) -> int:
        """data/skipped_samples: all ranks' skips in this run plus the total before a restart.
        A collective: every rank calls it at the same step."""
        mine = torch.tensor([float(self.train_data.skipped_samples if self.train_data else 0)],
                            dtype=torch.float64)
        return self.skipped_before + int(self.strategy.all_reduce(mine, op="sum")[0])

    def _optimizer_step(self, batches) -> dict[str, float]:
        accum = self.spec.train.grad_accum
        totals: dict[str, float] = {}
        micro_batches = [_to_device(next(batches), self.device) for _ in range(accum)]
        self.batches_consumed += accum
        # Seeded per (seed, rank, step), after the data is drawn: noise is the same with
        # or without a restart.
        torch.manual_seed(self.spec.train.seed * 1_000_003 + self.rank * 10_007 + self.step)
        for micro, batch in enumerate(micro_batches):
            self.ctx.global_step = self.step
            with self.strategy.micro_step(is_last=micro == accum - 1):
                metrics = self.job.train_step(self.ctx, batch)
            loss = metrics.get("loss")
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {self.step} on rank {self.rank}; checkpoints up to "
                    f"the last good one are kept in {self.spec.run_dir}. Lower "
                    "train.optimizer.lr, set train.grad_clip, or try strategy.precision=fp32")
            for key, value in metrics.items():
                weight = 1.0 if "/" in key else 1.0 / accum  # step outputs come once
                totals[key] = totals.get(key, 0.0) + value * weight
        return totals

    def _log_window(self, window: "_Window") -> None:
        spec = self.spec
        means = window.means()
        keys = sorted(means)
        reduced = self.strategy.all_reduce(torch.tensor([means[k] for k in keys], dtype=torch.float64))
        metrics = {f"train/{k}": float(v) for k, v in zip(keys, reduced)}
        elapsed = max(window.elapsed(), 1e-9)
        samples = window.count * spec.train.batch_size * spec.train.grad_accum * self.world_size
        metrics["train/samples_per_second"] = samples / elapsed
        for name in self.strategy.names:
            lr = self.strategy.lr(name)
            if lr is not None:
                metrics[f"train/lr/{name}"] = lr
        eta = (spec.train.steps - self.step) * elapsed / window.count
        loss = metrics.get("train/loss", float("nan"))
        skipped = ""
        if spec.data.on_error == "skip":
            metrics["data/skipped_samples"] = self._skipped_samples()
            skipped = f" | {metrics['data/skipped_samples']:,} samples skipped"
        self._print(f"step {self.step}/{spec.train.steps} | loss {loss:.4f} | "
                    f"{metrics['train/samples_per_second']:,.0f} samples/s | eta {_clock(eta)}{skipped}")
        if self.logger:
            self.logger.log_metrics(metrics, step=self.step)

    # -- evaluation and samples -----------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> None:
        spec = self.spec
        with self.strategy.evaluation() as modules:
            if self.job.evaluate is not None:
                self._evaluate_metrics(modules)
            if spec.eval.metrics:
                self._sample_metrics(modules)
            if self.rank == 0:
                generator = torch.Generator().manual_seed(spec.train.seed)
                images = self.job.sample(modules, spec.eval.num_samples, generator)
                self._save_samples(images)
                if self.job.visuals is not None:
                    self._save_visuals(modules, generator)

    def _evaluate_metrics(self, modules) -> None:
        spec = self.spec
        sums: dict[str, float] = {}
        count = 0
        batches = eval_batches(self.index, spec.data.eval_split, spec.train.batch_size,
                               self.rank, self.world_size, on_error=spec.data.on_error,
                               allow_pipe=spec.data.allow_pipe)
        for i, batch in enumerate(batches):
            if i >= spec.eval.max_batches:
                break
            batch = _to_device(batch, self.device)
            size = len(batch["image"]) if "image" in batch else len(next(iter(batch.values())))
            for key, value in self.job.evaluate(modules, batch).items():
                sums[key] = sums.get(key, 0.0) + value * size
            count += size
        keys = self._all_keys(sums)
        vector = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64)
        total = self.strategy.all_reduce(vector, op="sum")
        if total[-1] == 0:
            return
        metrics = {f"eval/{k}": float(v / total[-1]) for k, v in zip(keys, total[:-1])}
        self._print(_metrics_line(f"eval at step {self.step}", metrics))
        if self.logger:
            self.logger.log_metrics(metrics, step=self.step)

    def _sample_metrics(self, modules) -> None:
        """eval.metrics (FID, KID, ...): every rank samples and extracts its share (a collective)."""
        if self._periodic is None:
            from gentrain.evaluation.periodic import PeriodicSampleMetrics

            self._periodic = PeriodicSampleMetrics(self.spec, self.index, self.rank, self.world_size, self.device,
                                                   self.strategy.all_reduce)
        metrics = self._periodic(self.job, modules)
        if metrics:
            self._print(_metrics_line(f"eval at step {self.step}", metrics))
            if self.logger:
                self.logger.log_metrics(metrics, step=self.step)
                if self._periodic.reference is not None and not self._periodic.reference_logged:
                    self.logger.log_artifact(str(self._periodic.reference.path), "eval/reference")
                    self._periodic.reference_logged = True

    def _all_keys(self, sums: dict) -> list[str]:
        # Every rank must reduce the same keys, even one whose eval share was empty.
        if not torch.distributed.is_initialized():
            return sorted(sums)
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, sorted(sums))
        return sorted(set().union(*gathered))

    def _save_samples(self, images: torch.Tensor, kind: str = "samples") -> Path:
        """A grid PNG into <run dir>/<kind>/step-N.png, logged as an MLflow artifact."""
        if "://" in self.spec.storage_path:
            folder = Path(tempfile.mkdtemp())
        else:
            folder = Path(self.spec.run_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{step_dir_name(self.step)}.png"
        save_image_grid(images.detach().float().cpu(), path)
        if self.logger:
            self.logger.log_artifact(str(path), kind)
        return path

    def _save_visuals(self, modules, generator) -> None:
        """The job type's extra grids (reconstructions, latent traversals, ...) from a fixed
        held-out batch."""
        batch = next(iter(eval_batches(self.index, self.spec.data.eval_split, self.spec.eval.num_samples,
                                       0, 1, on_error=self.spec.data.on_error,
                                       allow_pipe=self.spec.data.allow_pipe)), None)
        if batch is None:
            return
        for name, images in self.job.visuals(modules, _to_device(batch, self.device), generator).items():
            self._save_samples(images, f"samples/{name}")

    # -- checkpoints ----------------------------------------------------------------
    def save_checkpoint(self) -> None:
        skipped = self._skipped_samples() if self.spec.data.on_error == "skip" else 0
        exported = self.strategy.export_state_dicts()  # a collective under ZeRO-3
        with tempfile.TemporaryDirectory() as directory:
            self.strategy.save(directory, self.rank)
            if self.rank == 0:
                # Plain fp32 weights of every network: sampling, eval and scoring load these
                # without knowing the strategy that trained them.
                torch.save({"networks": exported, "ema": self.strategy.ema_state()},
                           os.path.join(directory, MODEL_FILE))
                write_meta(directory, {
                    "step": self.step,
                    "batches_consumed": self.batches_consumed,
                    "skipped_samples": skipped,
                    "world_size": self.world_size,
                    "data_info": {"shape": list(self.index.shape), "num_classes": self.index.num_classes},
                    "mlflow_run_id": self.run_id,
                    "job_type": self.spec.job.type,
                    "spec": self.spec.to_dict(),
                    "time": time.time(),
                })
            has_files = any(os.scandir(directory))
            checkpoint = ray.train.Checkpoint.from_directory(directory) if has_files else None
            ray.train.report({"step": self.step}, checkpoint=checkpoint,
                             checkpoint_dir_name=step_dir_name(self.step))
        if self.logger:
            self.logger.set_tag("gentrain.last_checkpoint_step", str(self.step))

    def _print(self, message: str) -> None:
        if self.rank == 0:
            worker_print(message)  # marked: the driver shows these lines, not Ray's chatter

    def close(self) -> None:
        if self.logger:
            self.logger.close()


class _Window:
    """Metrics summed over the steps since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float]) -> None:
        self.count += 1
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        return {key: value / self.count for key, value in self.sums.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _metrics_line(head: str, metrics: dict[str, float], width: int = 100) -> str:
    """`head | name value | ...` in about `width` characters, the top-level metrics first
    (per-dimension breakdowns such as kl_dim/03 are left to MLflow, which has all)."""
    names = sorted(metrics, key=lambda key: ("/" in key[5:], key))
    line, shown = head, 0
    for key in names:
        part = f" | {key[5:]} {metrics[key]:.4f}"
        if len(line) + len(part) > width or "/" in key[5:]:
            break
        line, shown = line + part, shown + 1
    if shown < len(metrics):
        line += f" | +{len(metrics) - shown} more in MLflow"
    return line


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
