"""JobSpec: the one input of a gentrain job, loaded from YAML with safe_load only.

    gentrain validate vae/debug train.steps=200 scaling.num_workers=1

A leaf: plain dataclasses, the strict YAML reading of files and `key=value` overrides
(`gentrain.specfile`: duplicate keys, base-60 numbers and absurd sizes are errors), and
the rules that need nothing but the spec itself (types, bounds, fields that only apply
together). It imports no gentrain module but the schema helpers (schema, specfile,
redaction). What needs the registry, the strategies, the metrics, or this machine (the
job type's config, named specs such as `vae/debug`, storage, weight files) is checked
once, on the driver, by `gentrain.validation`; workers receive what it validated.
Overrides are parsed as YAML scalars (`train.optimizer.lr=3e-4`,
`strategy.grad_checkpointing=true`); every problem is reported at once.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gentrain.redaction import describe
from gentrain.schema import SpecError, bounds, build, required, to_dict
from gentrain.specfile import MAX_DEPTH, YAMLProblem, load_yaml, read_spec_file

Precision = Literal["fp32", "bf16", "fp16"]
StrategyName = Literal["ddp", "deepspeed", "accelerate", "fsdp"]


@dataclass
class JobSection:
    type: str = field(metadata=required("name a registered job type, e.g. `type: vae` "
                                        "(`gentrain list` shows them)"))
    config: dict[str, Any] = field(default_factory=dict)
    # The job type's sampler settings (its `sampler` dataclass), e.g. `sampling: {temperature: 0.8}`;
    # `gentrain sample --set temperature=0.7` overrides them for one call.
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentSection:
    flip: bool = False  # random horizontal flip
    crop_padding: int = field(default=0, metadata=bounds(ge=0, help="pad then random-crop back"))


@dataclass
class DataSection:
    # A packed data set: a folder or URL (http(s)://, s3://, gs://) holding index.json,
    # or `builtin:NAME` (packed into the cache on first use; see `gentrain data pack`).
    source: str = "builtin:digits"
    train_split: str = "train"
    eval_split: str = "test"
    shuffle_buffer: int = field(default=1000, metadata=bounds(ge=0))
    loader_workers: int = field(default=0, metadata=bounds(ge=0))
    # A train split whose decoded samples fit in this many MiB is decoded once and kept in
    # memory (with loader_workers 0 and on_error fail); 0 always streams from the shards.
    cache_mb: int = field(default=256, metadata=bounds(ge=0, help="0 turns the decoded cache off"))
    augment: AugmentSection = field(default_factory=AugmentSection)
    # Infinite resampled shard streams with a fixed epoch length (very large sets).
    resampled: bool = False
    epoch_samples: int | None = field(default=None, metadata=bounds(ge=1, help="with resampled"))
    on_error: Literal["fail", "skip"] = "fail"  # a corrupt or missing shard
    allow_pipe: bool = False  # `pipe:` URLs run shell commands: opt in explicitly


@dataclass
class OptimizerSection:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = field(default=1e-3, metadata=bounds(gt=0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    momentum: float = field(default=0.9, metadata=bounds(ge=0))
    # How torch runs the update (gentrain.optim.implementation_kwargs): auto = fused under
    # ddp and accelerate, torch's own choice under deepspeed and fsdp.
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")


@dataclass
class ScheduleSection:
    name: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = field(default=0, metadata=bounds(ge=0))
    min_lr_ratio: float = field(default=0.0, metadata=bounds(ge=0, le=1))


@dataclass
class TrainSection:
    steps: int = field(default=1000, metadata=bounds(ge=1))
    batch_size: int = field(default=64, metadata=bounds(ge=1, help="samples per worker per step"))
    grad_accum: int = field(default=1, metadata=bounds(ge=1))
    grad_clip: float | None = field(default=1.0, metadata=bounds(gt=0, help="null disables clipping"))
    seed: int = 0
    log_every: int = field(default=10, metadata=bounds(ge=1))
    # A wall-clock budget from the first step: seconds, or "90s", "5m", "2h". Checked every
    # log_every steps (rank 0's clock, agreed by all ranks); the run then ends as at train.steps.
    max_time: float | str | None = None
    # A non-finite loss or gradient (gentrain.nonfinite): stop the run, skip the update, or
    # roll back to the newest good checkpoint with a lower learning rate.
    nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    nonfinite_max_skips: int = field(default=10, metadata=bounds(ge=0, help="skipped updates in a row before stopping"))
    nonfinite_lr_factor: float = field(default=0.5, metadata=bounds(
        gt=0, lt=1, help="rollback: the learning rate is multiplied by it at each rollback"))
    nonfinite_max_rollbacks: int = field(default=3, metadata=bounds(ge=1, help="rollbacks in the run before stopping"))
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)

    @property
    def max_seconds(self) -> float | None:
        """train.max_time in seconds (None: no budget); the spec was validated (duration_problem)."""
        return None if self.max_time is None else parse_duration(self.max_time)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | str) -> float:
    """Seconds of `value`: a number of seconds, or a string "90", "90s", "1.5m", "2h".
    Raises ValueError on anything else, and on a value that is not positive and finite."""
    if isinstance(value, str):
        text = value.strip().lower()
        factor = _DURATION_UNITS.get(text[-1:], None) if text else None
        seconds = float(text[:-1] if factor else text) * (factor or 1.0)
    else:
        seconds = float(value)
    if not (0 < seconds < float("inf")):
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


def duration_problem(value, path: str) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError:
        return (f"{path}: {describe(value)} is not a time budget; write seconds (90) or a number "
                "with s, m or h (\"90s\", \"5m\", \"2h\"), greater than 0, or null for none")
    return None


@dataclass
class StrategySection:
    name: StrategyName = "ddp"
    precision: Precision = "fp32"
    grad_checkpointing: bool = False
    # deepspeed only
    zero_stage: int = field(default=0, metadata=bounds(ge=0, le=3))
    offload_optimizer: bool = False
    offload_param: bool = False
    deepspeed_config: dict[str, Any] = field(default_factory=dict)  # merged under gentrain's
    # accelerate only
    accelerate_mode: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class ScalingSection:
    num_workers: int = field(default=2, metadata=bounds(ge=1))
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)


@dataclass
class TrackingSection:
    # null: $MLFLOW_TRACKING_URI, else a local SQLite file ./mlflow.db.
    uri: str | None = None
    experiment: str = "gentrain"
    enabled: bool = True
    # CPU, memory (and GPU where NVML is installed) as system/* metrics, rank 0's node.
    system_metrics: bool = True
    system_metrics_interval: float = field(default=15.0, metadata=bounds(ge=1, help="seconds between samples"))
    # The trained model as an MLflow model (pyfunc) at the end of a run.
    log_model: bool = True
    # Also register it in the Model Registry under this name (a new version per run).
    register_model: str | None = None
    # Also log every checkpoint's weights as an MLflow model of the run at its step (rank 0,
    # in the background; not registered). Off by default: each is a copy of model.pt.
    log_model_checkpoints: bool = False


@dataclass
class CheckpointSection:
    every: int = field(default=100, metadata=bounds(ge=1))
    keep: int = field(default=3, metadata=bounds(ge=1))
    max_failures: int = field(default=0, metadata=bounds(ge=-1, help="-1 retries forever"))
    # Write each checkpoint in the background: the state is copied to host memory at the
    # step, then written, hashed and handed to Ray Train while training goes on (one at a
    # time; the last is complete before the run ends). ddp, accelerate and fsdp; not
    # deepspeed, whose engine writes its ZeRO shards itself (gentrain.checkpoint_writer).
    asynchronous: bool = False


@dataclass
class EvalSection:
    every: int = field(default=0, metadata=bounds(ge=0, help="0: only at the start (eval.at_start) and at the end"))
    # The evaluation before the first step of a fresh run: the untrained baseline of every
    # metric and a sample grid. false: the first step comes sooner (vae/cifar10 on 2 CPUs:
    # 8 s sooner); the evaluations every eval.every steps and at the end stay.
    at_start: bool = True
    num_samples: int = field(default=64, metadata=bounds(ge=1))
    max_batches: int = field(default=20, metadata=bounds(ge=1))
    # Sample metrics at every evaluation (gentrain.evaluation.periodic): fid, kid, is, pr.
    # Names, extractor and settings are checked against the metrics by gentrain.validation.
    metrics: list[str] = field(default_factory=list)
    fid_samples: int = field(default=10_000, metadata=bounds(ge=2, help="50000 is the published standard"))
    sample_batch_size: int = field(default=250, metadata=bounds(ge=1, help="samples drawn and extracted at once"))
    extractor: str = "inception"  # inception | classifier:REF (a classifier run or checkpoint)
    inception_weights: str | None = None  # null: $GENTRAIN_INCEPTION_WEIGHTS
    is_splits: int = field(default=10, metadata=bounds(ge=1, help="Inception Score splits; at most fid_samples"))
    kid_subsets: int = field(default=100, metadata=bounds(ge=2, help="kid_std is the spread over the subsets"))
    kid_subset_size: int | None = field(default=None, metadata=bounds(
        ge=2, help="below fid_samples; null: min(1000, fid_samples // 2)"))
    # Named sampler settings over job.sampling, e.g. {ddim50: {sampler: ddim, steps: 50}}: every
    # evaluation also draws num_samples under each (rank 0) and logs its throughput as
    # sample/<name>/samples_per_second; the grid's own draw is sample/samples_per_second.
    sampler_rates: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(kw_only=True)
class JobSpec:
    name: str = "gentrain"
    job: JobSection = field(metadata=required(
        "every spec names its job type, e.g. `job: {type: vae}` (`gentrain list` shows them)"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    storage_path: str = "./runs"

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.storage_path, self.name)


def field_rules(spec: JobSpec) -> list[str]:
    """Rules that span fields of the spec alone (each says how to fix it)."""
    problems = []
    gpus = spec.scaling.resources_per_worker.get("GPU", 0)
    if gpus and not spec.scaling.use_gpu:
        problems.append(f"scaling.resources_per_worker.GPU: {gpus} is set but scaling.use_gpu is "
                        "false; either set scaling.use_gpu=true or remove GPU from resources_per_worker")
    if spec.data.epoch_samples is not None and not spec.data.resampled:
        problems.append(f"data.epoch_samples: {spec.data.epoch_samples} only applies with "
                        "data.resampled=true; set it, or remove epoch_samples (exact epochs "
                        "use the index's sample counts)")
    strategy = spec.strategy
    if strategy.name != "deepspeed":
        for key in ("zero_stage", "offload_optimizer", "offload_param", "deepspeed_config"):
            if getattr(strategy, key):
                problems.append(f"strategy.{key}: only applies to strategy.name=deepspeed "
                                f"(got {strategy.name!r}); remove it or switch strategy")
    if strategy.offload_param and strategy.zero_stage != 3:
        problems.append(f"strategy.offload_param: needs strategy.zero_stage=3 (got {strategy.zero_stage})")
    if strategy.offload_optimizer and strategy.zero_stage == 0:
        problems.append("strategy.offload_optimizer: needs strategy.zero_stage >= 1 (got 0)")
    if strategy.accelerate_mode != "ddp" and strategy.name != "accelerate":
        problems.append(f"strategy.accelerate_mode: only applies to strategy.name=accelerate "
                        f"(got {strategy.name!r})")
    if spec.checkpoint.asynchronous and strategy.name == "deepspeed":
        problems.append("checkpoint.asynchronous: true is not available with strategy.name=deepspeed: its "
                        "engine writes the ZeRO shards from the live partitions itself (save_checkpoint), so "
                        "there is no host copy to write in the background; set checkpoint.asynchronous=false, "
                        "or use strategy.name=ddp, accelerate or fsdp")
    max_time = duration_problem(spec.train.max_time, "train.max_time")
    if max_time:
        problems.append(max_time)
    if spec.train.schedule.warmup_steps >= spec.train.steps:
        problems.append(f"train.schedule.warmup_steps: {spec.train.schedule.warmup_steps} must be "
                        f"< train.steps ({spec.train.steps})")
    return problems


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=value` -> (["a", "b"], value), the value read by the same strict YAML loader as files."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        keys = key.split(".")
        if not sep or not key or any(not part for part in keys):
            problems.append(f"override {describe(item)}: expected key=value, e.g. train.steps=200")
            continue
        if len(keys) > MAX_DEPTH:
            problems.append(f"override {describe(key)}: {len(keys)} levels deep; spec fields are a "
                            "few levels deep, e.g. train.optimizer.lr=3e-4")
            continue
        try:
            value = load_yaml(raw) if raw != "" else ""
        except YAMLProblem as exc:
            column = f" (column {exc.column} of the value)" if exc.column else ""
            fix = f"; quote a string value, e.g. '{key}=\"...\"'" if "not valid YAML" in exc.problem else ""
            problems.append(f"override {describe(key)}: {exc.problem}{column}{fix}")
            continue
        parsed.append((keys, value))
    if problems:
        raise SpecError(problems, "overrides")
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for keys, value in parse_overrides(overrides):
        set_path(data, keys, value)
    return data


def set_path(data: dict, keys: list[str], value: Any) -> None:
    """data[k0][k1]... = value, making the mappings on the way (as an override does)."""
    node = data
    for part in keys[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[keys[-1]] = value


def read_yaml(path: Path) -> dict:
    """The spec file's top-level mapping (strict and bounded: see gentrain.specfile)."""
    return read_spec_file(Path(path))


def build_spec(data: Any, problems: list[str]) -> JobSpec | None:
    """The JobSpec of a mapping, appending every field and cross-field problem to `problems`
    (None when a required field is missing). `job.config` stays a plain mapping here: the
    job type's own config is gentrain.validation's to check."""
    spec = build(JobSpec, data, "", problems)
    if spec is not None:
        problems += field_rules(spec)
    return spec


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """A spec checked on its own (types, bounds, field rules); raise SpecError.
    `gentrain.validation.validate` is the full check a job must pass before it runs."""
    problems: list[str] = []
    spec = build_spec(data, problems)
    if problems:
        raise SpecError(problems, source)
    return spec


def dump_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
