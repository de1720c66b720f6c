"""JobSpec: the one input of a gentrain job, loaded from YAML with safe_load only.

    gentrain validate vae/debug train.steps=200 scaling.num_workers=1

A spec names a bundled spec (`vae/debug`, i.e. jobs/gentrain_jobs/vae/specs/debug.yaml)
or a file. `key=value` overrides are parsed as YAML scalars (`train.lr=3e-4`,
`strategy.grad_checkpointing=true`). Files and overrides are read strictly
(`gentrain.specfile`: duplicate keys, base-60 numbers and absurd sizes are errors).
Validation reports every problem at once; see `gentrain.schema` for how fields are
checked and `gentrain.spec_checks` for names, paths, storage and secrets.
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
from gentrain.spec_checks import check_storage, expand_user, spec_problems
from gentrain.specfile import MAX_DEPTH, YAMLProblem, load_yaml, read_spec_file

Precision = Literal["fp32", "bf16", "fp16"]
StrategyName = Literal["ddp", "deepspeed", "accelerate"]


@dataclass
class JobSection:
    type: str = field(metadata=required("name a registered job type, e.g. `type: vae` "
                                        "(`gentrain list` shows them)"))
    config: dict[str, Any] = field(default_factory=dict)


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
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)


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


@dataclass
class CheckpointSection:
    every: int = field(default=100, metadata=bounds(ge=1))
    keep: int = field(default=3, metadata=bounds(ge=1))
    max_failures: int = field(default=0, metadata=bounds(ge=-1, help="-1 retries forever"))


@dataclass
class EvalSection:
    every: int = field(default=0, metadata=bounds(ge=0, help="0 evaluates only at the end"))
    num_samples: int = field(default=64, metadata=bounds(ge=1))
    max_batches: int = field(default=20, metadata=bounds(ge=1))
    # Sample metrics at every evaluation (gentrain.evaluation.periodic): fid, kid, is, pr.
    metrics: list[str] = field(default_factory=list)
    fid_samples: int = field(default=10_000, metadata=bounds(ge=2, help="50000 is the published standard"))
    sample_batch_size: int = field(default=250, metadata=bounds(ge=1, help="samples drawn and extracted at once"))
    extractor: str = "inception"  # inception | classifier:REF (a classifier run or checkpoint)
    inception_weights: str | None = None  # null: $GENTRAIN_INCEPTION_WEIGHTS
    is_splits: int = field(default=10, metadata=bounds(ge=1, help="Inception Score splits; at most fid_samples"))
    kid_subsets: int = field(default=100, metadata=bounds(ge=2, help="kid_std is the spread over the subsets"))
    kid_subset_size: int | None = field(default=None, metadata=bounds(
        ge=2, help="below fid_samples; null: min(1000, fid_samples // 2)"))

    def __post_init__(self):
        from gentrain.evaluation.extractors import check_extractor_choice
        from gentrain.metrics.settings import SPEC_NAMES, MetricSettings
        from gentrain.metrics.summary import SAMPLE_METRICS

        problems = []
        unknown = [name for name in self.metrics if name not in SAMPLE_METRICS]
        if unknown:
            problems.append(f"metrics has unknown {', '.join(map(repr, unknown))}; known: "
                            f"{', '.join(SAMPLE_METRICS)} (likelihoods come from the job type's evaluate)")
        problem = check_extractor_choice(self.extractor)
        if problem:
            problems.append(f"extractor {problem}")
        problems += MetricSettings.of_spec(self).problems(self.metrics, self.fid_samples, SPEC_NAMES,
                                                          bounds_checked=True)
        if problems:
            raise ValueError("; ".join(problems))
        reference = self.extractor[len("classifier:"):]
        if self.extractor.startswith("classifier:") and os.path.exists(os.path.expanduser(reference)):
            # Ray workers run in another cwd: a relative folder is resolved here, on the driver.
            self.extractor = "classifier:" + os.path.abspath(os.path.expanduser(reference))

    def environment_problems(self) -> list[str]:
        """What this machine lacks for the spec (checked by load_spec, not for a checkpoint's spec)."""
        if not self.metrics or self.extractor != "inception":
            return []
        from gentrain.metrics.inception_weights import InceptionWeightsNotFoundError, resolve_weights_path

        try:
            resolve_weights_path(self.inception_weights)
        except InceptionWeightsNotFoundError as error:
            return [f"eval.inception_weights: {error}"]
        return []


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


def _cross_checks(spec: JobSpec) -> list[str]:
    """Rules that span fields (each says how to fix it)."""
    problems = spec_problems(spec)  # name, local paths, secrets
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
    if strategy.name == "deepspeed" and strategy.deepspeed_config:
        from gentrain.strategies.deepspeed import deepspeed_config

        try:  # conflicts with gentrain's own settings surface here, not on the workers
            deepspeed_config(spec, spec.scaling.num_workers)
        except SpecError as exc:
            problems += exc.problems
    if strategy.offload_param and strategy.zero_stage != 3:
        problems.append(f"strategy.offload_param: needs strategy.zero_stage=3 (got {strategy.zero_stage})")
    if strategy.offload_optimizer and strategy.zero_stage == 0:
        problems.append("strategy.offload_optimizer: needs strategy.zero_stage >= 1 (got 0)")
    if strategy.accelerate_mode != "ddp" and strategy.name != "accelerate":
        problems.append(f"strategy.accelerate_mode: only applies to strategy.name=accelerate "
                        f"(got {strategy.name!r})")
    elif strategy.accelerate_mode == "fsdp":
        problems.append("strategy.accelerate_mode: 'fsdp' is not supported yet (Accelerate 1.15 "
                        "silently keeps DDP on CPUs, and gentrain's GPU FSDP path is not built); "
                        "use strategy.accelerate_mode=ddp, or strategy.name=deepspeed with "
                        "strategy.zero_stage=3 to shard parameters")
    if spec.strategy.precision == "fp16" and not spec.scaling.use_gpu:
        problems.append("strategy.precision: 'fp16' needs GPU workers (on CPUs, DDP and Accelerate "
                        "silently run fp32 and DeepSpeed needs AVX512-FP16 units); use 'bf16' "
                        "on CPU, or set scaling.use_gpu=true")
    if spec.train.schedule.warmup_steps >= spec.train.steps:
        problems.append(f"train.schedule.warmup_steps: {spec.train.schedule.warmup_steps} must be "
                        f"< train.steps ({spec.train.steps})")
    return problems


def bundled_spec_dir() -> Path:
    import gentrain_jobs

    return Path(gentrain_jobs.__file__).resolve().parent


def find_spec_file(ref: str) -> Path:
    """`vae/debug` -> debug.yaml in job type vae's `spec_dir`; anything on disk -> itself."""
    expanded, problems = expand_user("spec", ref)
    if problems:
        raise FileNotFoundError(problems[0])
    path = Path(expanded)
    try:
        if path.is_file():
            return path
    except (OSError, ValueError):
        pass  # a name too long, or with a NUL byte: no such file
    if "/" in ref and not ref.endswith((".yaml", ".yml")):
        from gentrain.registry import job_types

        type_name, _, name = ref.partition("/")
        job_type = job_types().get(type_name)
        # A plug-in's specs live wherever its JobType.spec_dir says, not in a fixed layout.
        if job_type is not None and job_type.spec_dir is not None and "/" not in name:
            candidate = Path(job_type.spec_dir) / f"{name}.yaml"
            if candidate.is_file():
                return candidate
    known = ", ".join(bundled_specs()) or "none"
    raise FileNotFoundError(f"spec {describe(ref)}: no such file and no bundled spec by that name "
                            f"(bundled specs: {known}; `gentrain list` shows them)")


def bundled_specs() -> list[str]:
    """Short names of every bundled spec, e.g. `vae/debug`."""
    from gentrain.registry import job_types

    names = []
    for type_name, job_type in sorted(job_types().items()):
        if job_type.spec_dir is not None and Path(job_type.spec_dir).is_dir():
            names += [f"{type_name}/{p.stem}" for p in sorted(Path(job_type.spec_dir).glob("*.yaml"))]
    return names


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
        node = data
        for part in keys[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    return data


def read_yaml(path: Path) -> dict:
    """The spec file's top-level mapping (strict and bounded: see gentrain.specfile)."""
    return read_spec_file(Path(path))


def from_dict(data: dict, source: str = "spec") -> JobSpec:
    """Validate a spec mapping, including the job type's own config; raise SpecError."""
    from gentrain.registry import UnknownJobType, get_job_type

    problems: list[str] = []
    spec = build(JobSpec, data, "", problems)
    if spec is not None:
        problems += _cross_checks(spec)
        try:
            job_type = get_job_type(spec.job.type)
        except UnknownJobType as exc:
            problems.append(f"job.type: {exc}")
        else:
            config = build(job_type.config, spec.job.config, "job.config", problems)
            if config is not None:
                spec.job.config = to_dict(config)  # resolved: defaults filled in
                problems += job_type.check(spec)
                if job_type.validate is not None:
                    problems += job_type.validate(config, spec)
    if problems:
        raise SpecError(problems, source)
    spec.storage_path = _absolute_storage(spec.storage_path)
    return spec


def _absolute_storage(path: str) -> str:
    # Ray workers run in another cwd: a relative path must be resolved on the driver.
    if "://" in path:
        return path
    return str(Path(expand_user("storage_path", path)[0]).resolve())


def load_spec(ref: str, overrides: list[str] | None = None) -> JobSpec:
    """Find, read, override and validate a spec, then check this machine can run it:
    the storage folder is writable (before Ray or MLflow start) and eval weights exist."""
    path = find_spec_file(ref)
    data = apply_overrides(read_yaml(path), overrides or [])
    spec = from_dict(data, source=str(path))
    problems = spec.eval.environment_problems() + check_storage(spec)
    if problems:
        raise SpecError(problems, str(path))
    return spec


def job_config(spec: JobSpec):
    """The job type's config dataclass instance for a validated spec."""
    from gentrain.registry import get_job_type

    problems: list[str] = []
    config = build(get_job_type(spec.job.type).config, spec.job.config, "job.config", problems)
    if problems:
        raise SpecError(problems)
    return config


def dump_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
