"""The Ray Train worker: adapts the training engine (gentrain.engine) to Ray Train.

    gentrain run vae/debug      # launch.trainer hands train_loop_per_worker to a TorchTrainer

On every rank: the rank and world size from Ray Train's context, the restore from the
newest verified step-N folder after a failure or restart (gentrain.checkpoint), each saved step-N folder
reported to Ray Train (which persists it and keeps train.checkpoint.keep of them), and on
rank 0 the MLflow logger and the `[gentrain]` lines the driver shows. What happens in a
step, and when evaluation and checkpoints happen, is the engine's.
"""

from __future__ import annotations

import os
import tempfile

import ray.train
import torch

from gentrain.checkpoint import newest_good_checkpoint, step_dir_name
from gentrain.engine import Engine, from_rank_zero
from gentrain.nonfinite import NonFiniteError, can_hand_over, write_stop
from gentrain.launch.console import route_worker_logs, worker_print
from gentrain.paths import is_remote
from gentrain.spec import JobSpec
from gentrain.timeline import mark


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ray.train.torch.TorchTrainer (config from launch.trainer)."""
    route_worker_logs()
    job = config["job"]  # a gentrain.validation.ValidatedJob: checked once, on the driver
    run_worker(job.spec, config.get("run_id"), config.get("tracking_uri"), job.config,
               announced=tuple(config.get("announced", ())),
               run_started_ms=config.get("run_started_ms"),
               report_evaluations=bool(config.get("report_evaluations")),
               tracking_handoff=bool(config.get("tracking_handoff")))


EVALUATION_MARK = "gentrain/evaluation"  # in the reports report_evaluation makes


def run_worker(spec: JobSpec, run_id: str | None, tracking_uri: str | None, job_config=None,
               announced: tuple[str, ...] = (), run_started_ms: int | None = None,
               report_evaluations: bool = False, tracking_handoff: bool = False) -> None:
    """Build this rank's engine, continue from Ray Train's checkpoint if any, train to the end.
    `report_evaluations`: every evaluation's metrics also go to Ray Train (report_evaluation),
    for a sweep's trial (gentrain.sweep). `tracking_handoff`: rank 0's MLflow records go to
    the driver, which sends them (gentrain.tracking.relay)."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if rank == 0:
        mark("worker_start")
    logger = _run_logger(spec, run_id, tracking_uri, tracking_handoff) if rank == 0 else None
    monitor = None
    if logger and spec.tracking.system_metrics:
        from gentrain.tracking.system import SystemMetrics

        monitor = SystemMetrics(logger, spec.tracking.system_metrics_interval, run_started_ms,
                                torch_gpu=spec.scaling.use_gpu).start()
    try:
        engine = Engine(spec, job_config, rank=rank, world_size=context.get_world_size(),
                        device=_device(spec), logger=logger, print_fn=worker_print)
        engine.run_id = run_id
        if report_evaluations:
            engine.on_evaluation = report_evaluation
        restore(engine, spec, announced)
        try:
            engine.fit(save=report_checkpoint)
        except NonFiniteError as error:
            # Every rank raises it at the same step (an all-reduced decision). Raised to Ray
            # Train it would be retried up to checkpoint.max_failures times and fail the same
            # way: the ranks end here instead and the driver raises it (gentrain.nonfinite).
            engine.wait_for_checkpoint()  # every rank stopped at the same step: the last folder completes
            if not can_hand_over(spec.run_dir):
                raise
            if rank == 0:
                write_stop(spec.run_dir, error)
    finally:
        if monitor:
            monitor.stop()
        if logger:
            logger.close()


def restore(engine: Engine, spec: JobSpec, announced: tuple[str, ...] = ()) -> None:
    """Continue from the newest verified step-N folder of the run, whatever Ray Train offers.

    gentrain's listing is the source of truth (as for the driver's "continuing" line): Ray's
    newest registered checkpoint may be damaged, or older than a complete folder whose
    report Ray lost when a worker died right after it. Rank 0 verifies and every rank loads
    what it chose. Remote storage: Ray's checkpoint, verified after download.
    """
    offered = ray.train.get_checkpoint()
    if is_remote(spec.run_dir):
        if offered is not None:
            with offered.as_directory() as directory:
                engine.restore(directory)
            engine.print(f"resumed from step {engine.step} ({offered.path})")
        return
    choice = newest_good_checkpoint(spec.run_dir) if engine.rank == 0 else None
    folder = from_rank_zero(str(choice.folder) if choice and choice.folder else None, engine.world_size)
    if choice:  # what the driver has not said already: a folder cut short during this run
        for line in choice.rejection_lines():
            if line not in announced:
                engine.print(line)
    if folder is None:
        return
    engine.restore(folder, verified=True)
    engine.print(f"resumed from step {engine.step} ({folder})")


def report_checkpoint(engine: Engine) -> None:
    """Save into a temporary folder and hand it to Ray Train as step-N (every rank reports).
    checkpoint.asynchronous: the state is copied now and the same happens on the engine's
    checkpoint thread (gentrain.checkpoint_writer) while training goes on."""
    if engine.checkpoint_writer is not None:
        engine.save_in_background(lambda snapshot: _write_and_report(engine, snapshot))
        return
    with tempfile.TemporaryDirectory() as directory:
        engine.save(directory)
        _hand_to_ray(engine, directory, engine.step, engine.stopped_at_time_budget)
    # Each rank's report returns once its own files are copied into storage; after this
    # barrier every rank's are, so step-N is complete on disk before training goes on
    # (and a worker killed from here on leaves a folder the next start can verify and use,
    # whether or not Ray Train registered it).
    engine.strategy.barrier()


def _write_and_report(engine: Engine, snapshot) -> None:
    """report_checkpoint's work for a snapshot, on the checkpoint thread: the barrier (over the
    writer's own group) closes step-N on every rank before the next save may start."""
    with tempfile.TemporaryDirectory() as directory:
        snapshot.write(directory)
        _hand_to_ray(engine, directory, snapshot.step, snapshot.stopped_at_time_budget)
    snapshot.barrier()


def _hand_to_ray(engine: Engine, directory: str, step: int, stopped_at_time_budget: bool) -> None:
    has_files = any(os.scandir(directory))
    checkpoint = ray.train.Checkpoint.from_directory(directory) if has_files else None
    tracking = engine.spec.tracking
    # Rank 0 (the one with a logger) has model.pt and gentrain.json here. The last step's
    # model is the driver's to log when tracking.log_model is on.
    if engine.logger and tracking.log_model_checkpoints and not (
            tracking.log_model and step >= engine.spec.train.steps):
        engine.logger.log_checkpoint_model(directory)
    ray.train.report({"step": step, "stopped_at_time_budget": stopped_at_time_budget},
                     checkpoint=checkpoint, checkpoint_dir_name=step_dir_name(step))


def report_evaluation(engine: Engine, metrics: dict) -> None:
    """An evaluation's metrics, the latest train/* and the step, reported to Ray Train without
    a checkpoint (every rank reports; Ray Train hands rank 0's to its callbacks). A checkpoint
    being reported in the background is waited for first: reports go to Ray in order."""
    engine.wait_for_checkpoint()
    values = {"step": engine.step, EVALUATION_MARK: 1}
    values.update(engine.last_train_metrics)
    values.update(metrics)
    ray.train.report(values)


def _device(spec: JobSpec) -> torch.device:
    return ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")


def _run_logger(spec: JobSpec, run_id: str | None, tracking_uri: str | None, handoff: bool = False):
    """Rank 0's MLflow logger (None when tracking is off). With `handoff` it imports no
    MLflow: the driver sends what it writes."""
    if not (run_id and tracking_uri):
        return None
    from gentrain.tracking.logger import RunLogger
    from gentrain.tracking.spool import spool_dir_for

    # The folder the driver and `gentrain sync` look in for what was not sent.
    return RunLogger(tracking_uri, run_id, spool_dir=spool_dir_for(spec.run_dir), handoff=handoff)
