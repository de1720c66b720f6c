"""The training engine: one job's networks, optimizers, strategy and step, without Ray.

    engine = Engine(load_spec("vae/debug", ["train.steps=20"]))
    engine.fit()                                   # checkpoints into <storage_path>/<name>/step-N/
    images = engine.sample(16, seed=0)

The Ray Train worker (gentrain.loop) adapts it: it supplies the rank and world size,
restores from Ray's checkpoint and reports each saved folder. Tests, benchmarks and
notebooks drive the same object on one process (world size 1 under ddp needs no process
group; deepspeed and accelerate need one: `gentrain.bench.common.one_rank_process_group`).

    build -> strategy.setup -> StepContext -> per step: micro_step -> job.train_step

This is the only place that sequence is written. The job type owns what happens inside
a step; the engine owns when things happen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Callable, Iterator

import torch

from gentrain.checkpoint import (checkpoint_problem, file_manifest, newest_good_checkpoint, read_meta, step_dir_name,
                                 write_meta)
from gentrain.checkpoint_writer import CheckpointWriter, Snapshot, gather_manifests, snapshot_files
from gentrain.context import StepContext
from gentrain.data.augment import Augmentation
from gentrain.data.index import load_index
from gentrain.data.pipeline import batches_per_epoch, train_batches
from gentrain.data.position import DataPosition, advance, continue_batches
from gentrain.progress import Window, clock
from gentrain.nonfinite import NonFiniteError, NonFiniteRollback, check_weights, rollback_line, stop_message
from gentrain.optim import make_optimizer
from gentrain.registry import DataInfo, JobType, SampleRequest, get_job_type, job_config, sampler_settings
from gentrain.spec import JobSpec
from gentrain.strategies import StepSettings, make_strategy
from gentrain.strategies.limits import nonfinite_problem
from gentrain.timeline import mark


class Engine:
    """Everything one rank of a job holds. Collectives (optimizer_step, evaluate, save,
    train_metrics) must be entered by every rank at the same step."""

    def __init__(self, spec: JobSpec, config=None, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None, data_info: DataInfo | None = None,
                 logger=None, print_fn: Callable[[str], None] | None = print):
        """`config`: the job type's config (default: from the spec); `data_info`: what a sample
        is (default: read from the data index); `logger`: a tracking.RunLogger or anything with
        log_metrics/log_artifact/set_tag (rank 0 only); `print_fn`: progress lines (rank 0)."""
        if not spec.scaling.use_gpu:
            # DeepSpeed picks its accelerator when first imported; say CPU before it guesses.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        problem = nonfinite_problem(spec.train.nonfinite, spec.run_dir)
        if problem:
            raise ValueError(problem)
        self.spec = spec
        self.job = get_job_type(spec.job.type)
        self.config = job_config(spec) if config is None else config
        self.sampler = sampler_settings(spec)  # the job type's sampler settings (job.sampling)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device or "cpu")
        self.logger = logger if rank == 0 else None
        self._print_fn = print_fn
        self._index = None
        self._mark("engine_start")
        self.data_info = data_info or DataInfo.of_index(self.index)
        self.job.check_data(self.data_info)
        self._mark("dataset_open")
        self.strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), self.device)
        # ZeRO-3 and a family that allows it: every parameter partitioned as it is made.
        sharded = self.strategy.construction() if self.job.supports.sharded_build else contextlib.nullcontext()
        with sharded:
            modules = build_modules(self.job, self.config, self.data_info, spec.train.seed,
                                    grad_checkpointing=spec.strategy.grad_checkpointing)
        self._mark("model_built")
        self.strategy.setup(modules, self._optimizers(modules))
        self._mark("strategy_ready")
        # checkpoint.asynchronous: the thread that writes snapshots (gentrain.checkpoint_writer)
        self.checkpoint_writer = CheckpointWriter(world_size) if spec.checkpoint.asynchronous else None
        self.ctx = StepContext(self.strategy, self.config, spec.train.steps)
        self.step = 0  # optimizer steps done
        self.batches_consumed = 0  # per rank, micro-batches included (each world counts its own)
        # Where the data continues (gentrain.data.position): the position this engine started
        # from and its batches_consumed then; data_position() adds what was drawn since.
        self.position_base, self.consumed_at_base = DataPosition(0, world_size, 0), 0
        self.resumed = False
        self.train_data = None  # the train_batches iterator: its skipped_samples feed data/skipped_samples
        self.skipped_before = 0  # data/skipped_samples at the checkpoint this engine resumed from
        self.run_id = None  # the MLflow run the checkpoints name (a restart keeps logging into it)
        # train.nonfinite=rollback: rollbacks made in the run and the product of their lr
        # factors (both in every checkpoint's metadata: a resumed run continues with them).
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._evaluator = None
        self.stopped_at_time_budget = False  # fit ended at train.max_time, before train.steps
        # Called by fit on every rank after each evaluation with (engine, metrics): a sweep's
        # trial hands the metrics to Ray Tune (gentrain.sweep.trial). train/* of the latest
        # progress window are in `last_train_metrics` (all-reduced: the same on every rank).
        self.on_evaluation: Callable[["Engine", dict], None] | None = None
        self.last_train_metrics: dict[str, float] = {}
        # (seconds waiting for the batches, seconds of the whole step) of the last optimizer_step
        self.step_timing = (0.0, 0.0)

    @property
    def index(self):
        """The data set's index (loaded when first needed: a test feeding its own batches
        with `data_info` given never reads one)."""
        if self._index is None:
            self._index = load_index(self.spec.data.source, allow_pipe=self.spec.data.allow_pipe)
        return self._index

    def _optimizers(self, modules):
        section, strategy = self.spec.train.optimizer, self.spec.strategy.name
        if self.job.optimizers is not None:
            def build(params, lr=None, betas=None):  # the spec's optimizer, per-network lr/betas
                changes = {k: v for k, v in (("lr", lr), ("betas", betas)) if v is not None}
                return make_optimizer(params, dataclasses.replace(section, **changes), strategy)

            return self.job.optimizers(self.config, modules, build)
        return {name: make_optimizer(module.parameters(), section, strategy)
                for name, module in modules.items() if any(True for _ in module.parameters())}

    # -- training -------------------------------------------------------------------
    def fit(self, save: Callable[["Engine"], None] | None = None) -> None:
        """Train to spec.train.steps (or train.max_time) from where the engine stands: progress every
        train.log_every steps, evaluation at the start (eval.at_start), every eval.every steps
        and at the end, a checkpoint every checkpoint.every steps and at the end through `save`
        (default: save_into_run_dir, <run dir>/step-N/; in the background under
        checkpoint.asynchronous, the last one complete before fit returns). Under
        train.nonfinite=rollback a fresh run first saves its initial state (step-0), and a
        non-finite step rolls back (roll_back)."""
        spec = self.spec
        save = save or save_into_run_dir
        if self.step >= spec.train.steps:
            if self.on_evaluation is not None:
                # A sweep's trial stopped after its last checkpoint (Ctrl-C before its final
                # evaluation reached Tune): the scheduler and the sweep's table need that model's.
                self.print(f"already trained {self.step} of {spec.train.steps} steps; evaluating it for the sweep")
                self._evaluate_in_fit()
                return
            self.print(f"already trained {self.step} of {spec.train.steps} steps; nothing to do")
            return
        if not self.resumed:
            if spec.eval.at_start:
                self._evaluate_in_fit()
                self._mark("initial_evaluation_done")
            if spec.train.nonfinite == "rollback" and self.step == 0:
                save(self)  # the initial state: what a rollback before the first checkpoint restores
        batches = self.train_batches()
        self._mark("data_stream_open")
        window = Window()
        started = None  # train.max_time counts from the first step (rank 0's clock)
        first = True
        while self.step < spec.train.steps:
            if started is None:
                started = time.monotonic()
            try:
                metrics = self.optimizer_step(batches)
            except NonFiniteRollback as error:
                self.roll_back(error)  # or NonFiniteError: rollbacks exhausted
                batches = self.train_batches()  # from the restored data position
                window = Window()
                continue
            window.add(metrics, *self.step_timing)
            if self.checkpoint_writer is not None:
                self.checkpoint_writer.raise_if_failed()  # a background write that failed stops the run
            if first:
                first = False
                self._mark("first_step", step=self.step, data_wait=self.step_timing[0])
            last = self.step == spec.train.steps
            if self.step % spec.train.log_every == 0 or last:
                self._mark("step", step=self.step)
                self._report(window)
                window = Window()
                if not last and self._out_of_time(started):
                    last = self.stopped_at_time_budget = True
                    self.print(f"stopped at the time budget (train.max_time={spec.train.max_time}) "
                               f"after {self.step} steps")
            if spec.eval.every and self.step % spec.eval.every == 0 and not last:
                self._evaluate_in_fit()
            if self.step % spec.checkpoint.every == 0 or last:
                save(self)
                if self.logger and self.checkpoint_writer is None:  # a background one: once written
                    self.logger.set_tag("gentrain.last_checkpoint_step", str(self.step))
            if last:
                break
        if self.logger and self.stopped_at_time_budget:
            self.logger.set_tag("gentrain.stopped_at_time_budget", str(self.step))
        self._evaluate_in_fit()  # overlaps the last checkpoint's background write
        self.wait_for_checkpoint()  # the final folder is complete before fit returns

    def _evaluate_in_fit(self) -> None:
        metrics = self.evaluate()
        if self.on_evaluation is not None:
            self.on_evaluation(self, metrics)

    def _out_of_time(self, started: float) -> bool:
        """train.max_time spent, by rank 0's clock: the same answer on every rank (a collective
        when a budget is set)."""
        budget = self.spec.train.max_seconds
        if budget is None:
            return False
        spent = float(self.rank == 0 and time.monotonic() - started >= budget)
        return bool(self.strategy.all_reduce(torch.tensor([spent], dtype=torch.float64), op="sum")[0] > 0)

    def per_epoch(self, world_size: int) -> int:
        """Batches per rank per epoch in a world of `world_size` ranks."""
        data = self.spec.data
        epoch_samples = data.epoch_samples if data.resampled else None
        return batches_per_epoch(self.index, data.train_split, self.spec.train.batch_size,
                                 world_size, epoch_samples=epoch_samples)

    def data_position(self) -> DataPosition:
        """Where the data continues, in world-independent terms (gentrain.data.position)."""
        drawn = self.batches_consumed - self.consumed_at_base
        if drawn == 0:
            return self.position_base
        return advance(self.position_base, drawn, self.world_size, self.per_epoch)

    def train_batches(self) -> Iterator[dict]:
        """This rank's training batches from the engine's data position (mid-epoch after a
        restore; an epoch dealt by another world size is finished as gentrain.data.position says)."""
        data = self.spec.data
        position = self.data_position()
        self.position_base, self.consumed_at_base = position, self.batches_consumed

        def stream(rank, world_size, start_epoch, start_batch):
            return train_batches(
                self.index, data.train_split, self.spec.train.batch_size, rank, world_size,
                self.spec.train.seed, loader_workers=data.loader_workers, shuffle_buffer=data.shuffle_buffer,
                start_epoch=start_epoch, start_batch=start_batch,
                augment=Augmentation(flip=data.augment.flip, crop_padding=data.augment.crop_padding),
                resampled=data.resampled, epoch_samples=data.epoch_samples, on_error=data.on_error,
                allow_pipe=data.allow_pipe, cache_bytes=data.cache_mb * 2**20)

        self.train_data = continue_batches(position, self.rank, self.world_size, self.per_epoch, stream)
        return self.train_data

    def optimizer_step(self, batches: Iterator[dict]) -> dict[str, float]:
        """One optimizer step over train.grad_accum micro-batches drawn from `batches`; returns
        this rank's metrics (micro-batch means; per-network step outputs such as
        grad_norm/<name> once)."""
        accum = self.spec.train.grad_accum
        totals: dict[str, float] = {}
        began = time.perf_counter()
        micro_batches = [to_device(next(batches), self.device) for _ in range(accum)]
        waited = time.perf_counter() - began
        self.batches_consumed += accum
        # Seeded per (seed, rank, step), after the data is drawn: noise is the same with
        # or without a restart.
        seed_step(self.spec.train.seed * 1_000_003 + self.rank * 10_007 + self.step, self.device)
        for micro, batch in enumerate(micro_batches):
            self.ctx.global_step = self.step
            with self.strategy.micro_step(is_last=micro == accum - 1):
                metrics = self.job.train_step(self.ctx, batch)
            # Non-finite losses and gradients were judged before the update, on every rank
            # alike (ctx.step, gentrain.nonfinite): here a skipped step's metrics are left
            # out of the progress means (Window).
            for key, value in metrics.items():
                weight = 1.0 if "/" in key else 1.0 / accum  # step outputs come once
                totals[key] = totals.get(key, 0.0) + value * weight
        self.step += 1
        self.step_timing = (waited, time.perf_counter() - began)
        return totals

    def train_metrics(self, window: Window) -> dict[str, float]:
        """train/* (means over all ranks), samples/s, learning rates and
        data/skipped_samples for the steps in `window` (a collective).

        train/data_wait_fraction: the share of the window's step time spent waiting for
        batches (the ranks' mean), when the window timed its steps (Engine.fit does)."""
        spec = self.spec
        means = window.means()
        keys = sorted(means)
        values = [means[k] for k in keys]
        timed = window.step_seconds > 0
        if timed:  # the same on every rank: fit times every step it adds
            keys.append("data_wait_fraction")
            values.append(window.data_wait_seconds / window.step_seconds)
        reduced = self.strategy.all_reduce(torch.tensor(values, dtype=torch.float64))
        metrics = {f"train/{k}": float(v) for k, v in zip(keys, reduced)}
        samples = window.count * spec.train.batch_size * spec.train.grad_accum * self.world_size
        metrics["train/samples_per_second"] = samples / max(window.elapsed(), 1e-9)
        for name in self.strategy.names:
            lr = self.strategy.lr(name)
            if lr is not None:
                metrics[f"train/lr/{name}"] = lr
        if spec.data.on_error == "skip":
            metrics["data/skipped_samples"] = self.skipped_samples()
        if spec.train.nonfinite == "skip":  # the same on every rank: the guard's flags are all-reduced
            metrics["train/nonfinite_skipped"] = self.strategy.nonfinite.skipped
        if spec.train.nonfinite == "rollback":
            metrics["train/nonfinite_rollbacks"] = self.rollbacks
        return metrics

    def roll_back(self, error: NonFiniteRollback) -> str:
        """train.nonfinite=rollback, on every rank alike (a collective): restore the newest
        good checkpoint of the run folder as a resume does (weights, optimizer, schedule,
        data position; the noise is seeded per step), multiply the learning rate by
        train.nonfinite_lr_factor and count it. Raises NonFiniteError, as train.nonfinite=stop
        does, once train.nonfinite_max_rollbacks are made or no good checkpoint is left.
        Returns the folder restored; the caller draws its batches again (train_batches)."""
        train = self.spec.train
        self.wait_for_checkpoint()  # the newest folder may still be being written
        if self.rollbacks >= train.nonfinite_max_rollbacks:
            facts = self.strategy.nonfinite_facts(error.finding.network, self.rollbacks)
            raise NonFiniteError(stop_message(error.finding, error.done, facts))
        choice = newest_good_checkpoint(self.spec.run_dir) if self.rank == 0 else None
        folder = from_rank_zero(str(choice.folder) if choice and choice.folder else None, self.world_size)
        if choice:
            for line in choice.rejection_lines():
                self.print(line)
        if folder is None:
            raise NonFiniteError(f"{error}; train.nonfinite=rollback found no good checkpoint in "
                                 f"{self.spec.run_dir} to roll back to (the step-0 one is written at "
                                 "the start of a run; was the folder emptied?)")
        scale, count = self.lr_scale * train.nonfinite_lr_factor, self.rollbacks + 1
        self.strategy.drop_gradients()
        self.restore(folder, verified=True)  # sets lr_scale and rollbacks from the checkpoint
        self.strategy.scale_lr(scale / self.lr_scale)
        self.lr_scale, self.rollbacks = scale, count
        lrs = {name: self.strategy.base_lr(name) for name in self.strategy.names}
        self.print(rollback_line(error, self.step, folder, {k: v for k, v in lrs.items() if v is not None},
                                 count, train.nonfinite_max_rollbacks, train.nonfinite_lr_factor))
        if self.logger:
            self.logger.set_tag("gentrain.nonfinite_rollbacks", str(count))
        return folder

    def _report(self, window: Window) -> None:
        metrics = self.train_metrics(window)
        self.last_train_metrics = metrics
        eta = (self.spec.train.steps - self.step) * max(window.elapsed(), 1e-9) / window.count
        skipped = ""
        if "data/skipped_samples" in metrics:
            skipped = f" | {metrics['data/skipped_samples']:,} samples skipped"
        self.print(f"step {self.step}/{self.spec.train.steps} | loss {metrics.get('train/loss', float('nan')):.4f} | "
                   f"{metrics['train/samples_per_second']:,.0f} samples/s | eta {clock(eta)}{skipped}")
        if self.logger:
            self.logger.log_metrics(metrics, step=self.step)

    def skipped_samples(self) -> int:
        """data/skipped_samples: all ranks' skips in this run plus the total before a restart.
        A collective: every rank calls it at the same step."""
        mine = torch.tensor([float(self.train_data.skipped_samples if self.train_data else 0)],
                            dtype=torch.float64)
        return self.skipped_before + int(self.strategy.all_reduce(mine, op="sum")[0])

    # -- evaluation and samples -------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, eval.metrics (FID, ...), a sample grid and the job type's visuals
        (a collective); returns the metrics on rank 0."""
        if self._evaluator is None:
            from gentrain.evaluation.training import TrainingEvaluator

            self._evaluator = TrainingEvaluator(self)
        return self._evaluator()

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`n` samples in data space from the evaluation weights (EMA where kept), under the
        spec's job.sampling; seed defaults to train.seed (the grids' seed); `labels`: class
        conditioning for a class-conditional job type. A collective under ZeRO-3."""
        generator = torch.Generator().manual_seed(self.spec.train.seed if seed is None else seed)
        with self.strategy.evaluation() as modules:
            return self.job.sample(modules, self.config, SampleRequest(n, generator, self.sampler, labels))

    # -- checkpoints ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Every rank writes its share of the training state into `directory`; rank 0 adds
        model.pt (plain fp32 weights) and, last, the metadata with the manifest of every
        rank's files (size and sha256 of what was written). A collective."""
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        skipped, exported = self._checkpoint_start()
        # This rank's share, and on rank 0 the strategy-neutral state (portable_state.pt)
        # and the plain fp32 weights and EMA (model.pt) that sampling, eval and scoring load
        # without knowing the strategy (a collective under ZeRO).
        self.strategy.write_checkpoint(directory, self.rank, exported)
        self.strategy.barrier()  # ranks sharing a folder: every share is written before it is hashed
        # Each rank may write into its own folder (Ray merges them into step-N): the
        # metadata lists every rank's files, hashed where they were written.
        manifest = gather_manifests(file_manifest(directory), self.world_size)
        if self.rank == 0:
            write_meta(directory, {"files": manifest, **self._checkpoint_meta(skipped)})

    def snapshot(self) -> Snapshot:
        """What `save` would write now, copied to host memory, for a write in the background
        (checkpoint.asynchronous; gentrain.checkpoint_writer). A collective."""
        skipped, exported = self._checkpoint_start()
        files = self.strategy.checkpoint_files(self.rank, exported)
        if files is None:
            label = strategy_label(dataclasses.asdict(self.spec.strategy))
            raise ValueError(f"checkpoint.asynchronous: strategy {label} writes its checkpoint files itself "
                             "(no snapshot to write in the background); set checkpoint.asynchronous=false")
        writer = self.checkpoint_writer
        return Snapshot(snapshot_files(files), self._checkpoint_meta(skipped) if self.rank == 0 else None, self.step,
                        self.stopped_at_time_budget, self.world_size, writer.group if writer else None)

    def save_in_background(self, deliver: Callable[[Snapshot], None]) -> None:
        """checkpoint.asynchronous: wait for the previous checkpoint's write, take a snapshot
        of the state now and run `deliver(snapshot)` (which writes it: Snapshot.write) on the
        writer's thread; training goes on meanwhile. A collective."""
        writer = self.checkpoint_writer
        if writer is None:
            raise ValueError("save_in_background needs checkpoint.asynchronous=true")
        writer.wait()
        snapshot = self.snapshot()

        def write() -> None:
            deliver(snapshot)
            if self.logger:  # the tag fit sets after a synchronous save, once the folder is complete
                self.logger.set_tag("gentrain.last_checkpoint_step", str(snapshot.step))

        writer.start(snapshot.step, write)

    def wait_for_checkpoint(self) -> None:
        """Block until a checkpoint being written in the background is complete; raise its
        error (CheckpointWriteError). Nothing to do for synchronous saves."""
        if self.checkpoint_writer is not None:
            self.checkpoint_writer.wait()

    def _checkpoint_start(self) -> tuple[int, dict]:
        """data/skipped_samples and the exported fp32 weights, checked finite (collectives)."""
        skipped = self.skipped_samples() if self.spec.data.on_error == "skip" else 0
        exported = self.strategy.export_state_dicts()  # a collective under ZeRO-3
        check_weights(exported, self.step, lambda flag: self.strategy.all_reduce(flag, op="sum"))
        return skipped, exported

    def _checkpoint_meta(self, skipped: int) -> dict:
        """gentrain.json of a checkpoint of the state now, but for the manifest ("files")."""
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            # None: batches fed by the caller, not drawn from the data pipeline
            "data_position": self.data_position().to_dict() if self.train_data is not None else None,
            "skipped_samples": skipped,
            "world_size": self.world_size,
            "data_info": self.data_info.to_dict(),
            "mlflow_run_id": self.run_id,
            "nonfinite_rollbacks": self.rollbacks,
            "stopped_at_time_budget": self.stopped_at_time_budget,
            "lr_scale": self.lr_scale,  # already in the optimizer and schedule state: for the record
            "job_type": self.spec.job.type,
            "spec": self.spec.to_dict(),
            "time": time.time(),
        }

    def restore(self, directory: str | os.PathLike, verified: bool = False) -> dict:
        """Load what `save` wrote (every rank reads); the next step continues exactly.
        Weights are never loaded without their step and data position: a folder that
        fails `checkpoint.checkpoint_problem` raises before anything is loaded (callers
        choose one with `checkpoint.newest_good_checkpoint`, which has verified it)."""
        if not verified:
            problem = checkpoint_problem(directory)
            if problem:
                raise ValueError(f"{directory}: not a usable checkpoint: {problem}")
        meta = read_meta(str(directory))
        asked = self._spec_rates()  # before the checkpoint's optimizer state replaces them
        change = resume_change(meta, self.spec, self.world_size)
        if change is None:
            self.strategy.load(str(directory))
        else:
            self.print(change)
            self.strategy.load_portable(str(directory))
        self.step = int(meta["step"])
        self.batches_consumed = int(meta["batches_consumed"])
        self.position_base, self.consumed_at_base = self._saved_position(meta)
        self.skipped_before = int(meta.get("skipped_samples", 0))
        self.rollbacks = int(meta.get("nonfinite_rollbacks", 0))
        self.lr_scale = float(meta.get("lr_scale", 1.0))
        self._continue_at_the_spec_rates(asked, meta)
        self.resumed = True
        return meta

    def _spec_rates(self) -> dict[str, float]:
        """Every trained network's learning rate before the schedule, as the spec asks it
        (the factor of train.nonfinite=rollback's rollbacks taken out)."""
        return {name: rate / self.lr_scale for name in self.strategy.names
                if (rate := self.strategy.base_lr(name))}

    def _continue_at_the_spec_rates(self, asked: dict[str, float], meta: dict) -> None:
        """A resume trains at the spec's learning rate, not the one the checkpoint's optimizer
        and schedule state carry: otherwise a lowered `train.optimizer.lr` (the advice after a
        non-finite stop) would be ignored and the same steps would fail the same way. Only a
        change by one factor for every network is applied; another is reported, not applied."""
        trained = self._spec_rates()
        if trained.keys() != asked.keys() or all(
                math.isclose(asked[name], trained[name], rel_tol=1e-6) for name in asked):
            return
        factors = {asked[name] / trained[name] for name in asked}
        changes = ", ".join(f"{name} {trained[name]:g} -> {asked[name]:g}" for name in asked)
        where = f"step {meta['step']}"
        if len(factors) > 1 and not all(math.isclose(f, min(factors), rel_tol=1e-6) for f in factors):
            self.print(f"warning: the spec's learning rates differ from those {where} was trained at "
                       f"({changes}) by different factors: continuing at the checkpoint's")
            return
        self.strategy.scale_lr(min(factors))
        rollbacks = (f", times {self.lr_scale:g} from train.nonfinite=rollback's {self.rollbacks} rollbacks"
                     if self.lr_scale != 1.0 else "")
        self.print(f"learning rate changed since {where}: {changes} (the spec's{rollbacks}); "
                   "the optimizer and schedule state continue from the checkpoint")

    def _saved_position(self, meta: dict) -> tuple[DataPosition, int]:
        """The data position a checkpoint continues from, and the batches_consumed it counts from."""
        saved_world = int(meta.get("world_size", self.world_size))
        if meta.get("data_position"):
            position = DataPosition.from_dict(meta["data_position"])
        elif saved_world == self.world_size:  # older checkpoints, caller-fed batches: the per-rank count
            return DataPosition(0, self.world_size, 0), 0
        else:
            position = DataPosition.of_rank_count(self.batches_consumed, saved_world, self.per_epoch(saved_world))
        saved_batch = (meta.get("spec") or {}).get("train", {}).get("batch_size", self.spec.train.batch_size)
        if position.deal_world != self.world_size and saved_batch != self.spec.train.batch_size:
            raise ValueError(
                f"train.batch_size: {self.spec.train.batch_size} differs from the checkpoint's {saved_batch}, "
                f"and the epoch in progress was dealt to {position.deal_world} worker(s): a run continued on "
                f"another number of workers keeps its per-worker batch size; set train.batch_size={saved_batch}")
        return position, self.batches_consumed

    def print(self, message: str) -> None:
        if self.rank == 0 and self._print_fn is not None:
            self._print_fn(message)

    def _mark(self, event: str, **fields) -> None:
        if self.rank == 0:  # gentrain.timeline: a no-op unless GENTRAIN_TIMELINE is set
            mark(event, **fields)


def save_into_run_dir(engine: Engine) -> None:
    """fit's default save: <run dir>/step-N/, written in the background under checkpoint.asynchronous."""
    run_dir = engine.spec.run_dir
    if engine.checkpoint_writer is None:
        engine.save(os.path.join(run_dir, step_dir_name(engine.step)))
    else:
        engine.save_in_background(lambda snapshot: snapshot.write(os.path.join(run_dir, snapshot.dir_name)))


def build_modules(job: JobType, config, data_info: DataInfo, seed: int,
                  grad_checkpointing: bool = False) -> dict[str, torch.nn.Module]:
    """The job type's networks with the run's initial weights: seeded, so every rank starts
    identical (and inference.load_trained builds the same networks to load weights into)."""
    torch.manual_seed(seed)
    modules = job.build(config, data_info)
    if grad_checkpointing:
        for module in modules.values():
            if hasattr(module, "enable_grad_checkpointing"):  # an optional method of a network
                module.enable_grad_checkpointing(True)
    return modules


def resume_change(meta: dict, spec: JobSpec, world_size: int) -> str | None:
    """The line said when a checkpoint is continued on another world size or strategy (its
    state then comes from the strategy-neutral files, re-sharded); None: the same setup."""
    saved_world = int(meta.get("world_size", world_size))
    now = strategy_label(dataclasses.asdict(spec.strategy))
    saved = (meta.get("spec") or {}).get("strategy")
    before = strategy_label(saved) if saved else now  # a checkpoint without its spec: as before
    if saved_world == world_size and before == now:
        return None
    return (f"resuming {_workers(saved_world)} {before} checkpoint on {_workers(world_size)} {now}: "
            "optimizer state re-sharded from the strategy-neutral files")


def _workers(count: int) -> str:
    return f"{count} worker" + ("s" if count != 1 else "")


def strategy_label(section: dict) -> str:
    """ddp, accelerate, fsdp, deepspeed-zero3: what decides how the training state is laid out."""
    name = section.get("name", "ddp")
    return f"deepspeed-zero{section.get('zero_stage', 0)}" if name == "deepspeed" else name


def seed_step(seed: int, device: torch.device) -> None:
    """torch.manual_seed(seed) for what a step draws from: the CPU generator and, training on
    a GPU, CUDA's. The same generator states as torch.manual_seed, without its per-call cost
    (it queues a lazy seeding, with a captured traceback, for every accelerator type torch
    knows but this process has not started: about a millisecond a step on a CPU)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def from_rank_zero(value, world_size: int):
    """Rank 0's `value` on every rank (a collective when distributed)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
