"""Job types (model families) and how the platform finds them.

A job type is a small frozen dataclass of builders. A package makes one known by an
entry point in the group `gentrain.jobs`, exactly as the built-in ones do:

    [project.entry-points."gentrain.jobs"]
    my_family = "my_package.family:JOB"

The core never imports a family by name; it asks this registry. The whole contract,
with a complete minimal family, is docs/job-types.md.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from gentrain.schema import SpecError, build

if TYPE_CHECKING:
    import torch

    from gentrain.spec import JobSpec

ENTRY_POINT_GROUP = "gentrain.jobs"

# What one sample is, and the keys of the batches a job type receives for it (the data
# pipeline's collate, train_step, evaluate, visuals and score all read this table):
#   image:  {"image": float32 [B, C, H, W] in [0, 1], "label": int64 [B]}
#   tokens: {"tokens": int64 [B, T] in [0, vocab_size)}; BPE packs add "bytes" and
#           "first_bytes", int64 [B]: the UTF-8 bytes each sample and its first token stand for
#   vector: {"x": float32 [B, D], "label": int64 [B]}
# Held-out batches (evaluate, score) also carry "key": the samples' names.
BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image", "label"),
    "tokens": ("tokens",),
    "vector": ("x", "label"),
}
# Units a family may declare for its likelihood metrics (JobType.likelihoods).
LIKELIHOOD_UNITS = ("nats", "bits/dim", "bits/char", "bits/byte", "perplexity")


@dataclass(frozen=True)
class DataInfo:
    """What a sample is: a job type builds its networks from this.

    kind "image": shape (C, H, W), num_classes from the labels (0: unlabelled);
    kind "tokens": shape (T,), vocab_size tokens; kind "vector": shape (D,).
    """

    shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28)
    num_classes: int = 0
    kind: str = "image"
    vocab_size: int = 0  # tokens only
    # tokens of a BPE pack: its merges (left id, right id), so samples decode back to text
    merges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.kind not in BATCH_KEYS:
            raise ValueError(f"data kind {self.kind!r} is not one of {', '.join(BATCH_KEYS)}")
        if self.kind == "tokens" and self.vocab_size < 1:
            raise ValueError("data kind 'tokens' needs vocab_size >= 1")

    @property
    def input_key(self) -> str:
        """The batch key holding the samples themselves ("image", "tokens" or "x")."""
        return BATCH_KEYS[self.kind][0]

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return BATCH_KEYS[self.kind]

    @classmethod
    def of_index(cls, index) -> "DataInfo":
        """From a packed data set's index (its "text" kind holds byte tokens)."""
        kind = {"text": "tokens"}.get(index.kind, index.kind)
        return cls(tuple(index.shape), index.num_classes, kind, int(getattr(index, "vocab_size", 0) or 0),
                   tuple(getattr(index, "merges", ())))

    def to_dict(self) -> dict:
        data = {"kind": self.kind, "shape": list(self.shape), "num_classes": self.num_classes,
                "vocab_size": self.vocab_size}
        if self.merges:
            data["merges"] = [list(pair) for pair in self.merges]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "DataInfo":
        """What to_dict wrote (a checkpoint's metadata; older ones hold only shape and classes)."""
        return cls(tuple(data["shape"]), int(data.get("num_classes", 0)), data.get("kind", "image"),
                   int(data.get("vocab_size", 0)), tuple((int(a), int(b)) for a, b in data.get("merges", ())))


def batch_inputs(batch: Mapping) -> "torch.Tensor":
    """The samples of a batch of any kind (batch["image"], ["tokens"] or ["x"])."""
    for kind_keys in BATCH_KEYS.values():
        if kind_keys[0] in batch:
            return batch[kind_keys[0]]
    raise KeyError(f"a batch holds one of {', '.join(k[0] for k in BATCH_KEYS.values())}; got {sorted(batch)}")


def batch_length(batch: Mapping) -> int:
    return len(batch_inputs(batch))


@dataclass(frozen=True)
class NoSettings:
    """The sampler settings of a family that has none."""


@dataclass(frozen=True)
class SampleRequest:
    """What `sample` is asked to draw.

    settings: the family's sampler dataclass (JobType.sampler), filled from the spec's
    `job.sampling` and `gentrain sample --set key=value`; labels: class conditioning, one
    int64 per sample, or None (the family picks, e.g. uniformly); generator: the only
    randomness to use (CPU; move draws to the networks' device), so a seed gives the same
    samples on any machine.
    """

    n: int
    generator: "torch.Generator"
    settings: Any = field(default_factory=NoSettings)
    labels: "torch.Tensor | None" = None


ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Combination:
    """One way to train: a strategy, its ZeRO stage (deepspeed only) and a precision."""

    strategy: str
    precision: str
    zero_stage: int | None = None

    @property
    def overrides(self) -> list[str]:
        """The spec overrides that select it."""
        stage = [] if self.zero_stage is None else [f"strategy.zero_stage={self.zero_stage}"]
        return [f"strategy.name={self.strategy}", *stage, f"strategy.precision={self.precision}"]

    def __str__(self) -> str:
        zero = "" if self.zero_stage is None else f"-zero{self.zero_stage}"
        return f"{self.strategy}{zero}-{self.precision}"


@dataclass(frozen=True)
class Supports:
    """What a family declares it trains under. Every declared combination is run through
    `gentrain run` by the strategy matrix (tests/integration/test_strategy_matrix.py).

    `excluded` lists (strategy, precision, reason) pairs that the lists above would
    include but the family does not run; `gentrain validate` refuses them with the reason.

    `sharded_build`: under ZeRO-3 the networks are built inside `deepspeed.zero.Init`, each
    module partitioned as soon as it is made, so no rank holds the whole model. Only for a
    family whose `build` changes a parameter after the module holding it was made solely
    through `gentrain.initialise` (`whole_parameters`, `initialise_parameters`: one module's
    parameters gathered while they are written, the same values as a whole build). A plain
    write there (a parent zero-initialising a child's output layer, re-drawn weights,
    registering spectral norm, which needs the whole weight) would go into an already
    partitioned, empty tensor: silently lost, or an error. Families without it are built
    whole on every rank, then partitioned by `deepspeed.initialize`.
    """

    strategies: tuple[str, ...] = ("ddp",)
    precisions: tuple[str, ...] = ("fp32", "bf16")
    zero_stages: tuple[int, ...] = ZERO_STAGES  # with strategy.name=deepspeed
    excluded: tuple[tuple[str, str, str], ...] = ()
    sharded_build: bool = False

    def exclusion(self, strategy: str, precision: str) -> str | None:
        return next((reason for s, p, reason in self.excluded if (s, p) == (strategy, precision)), None)

    def combinations(self) -> list[Combination]:
        combos = []
        for strategy in self.strategies:
            for precision in self.precisions:
                if self.exclusion(strategy, precision) is not None:
                    continue
                stages = self.zero_stages if strategy == "deepspeed" else (None,)
                combos += [Combination(strategy, precision, stage) for stage in stages]
        return combos


@dataclass(frozen=True)
class JobType:
    """A model family: functions the platform calls, and declarations it reads.

    Every function receives the networks (`modules`, {name: nn.Module}) and the family's
    config dataclass; the platform never calls a network itself.

    - build(config, data_info) -> {name: nn.Module}
    - train_step(ctx, batch) -> {metric: float}; calls ctx.backward(loss, name) and
      ctx.step(name) as often and in whatever order the family needs (gentrain.context).
    - sample(modules, config, request: SampleRequest) -> Tensor [n, ...] in data space
      ([0, 1] for images); request.n, request.generator, request.settings (the `sampler`
      dataclass), request.labels (optional class conditioning).
    - evaluate(modules, config, batch, generator) -> {metric: per-sample mean} on a
      held-out batch (optional); draw any randomness (IWAE samples, fixed z) from generator.
    - optimizers(config, modules, make_optimizer) -> {name: Optimizer} (optional;
      default: one optimizer per module, from the spec's train.optimizer;
      make_optimizer(params, lr=None, betas=None) uses the spec's settings unless given)
    - visuals(modules, config, batch, generator) -> {name: images [N, C, H, W] in [0, 1]}
      (optional: extra grids such as reconstructions, saved at every evaluation as
      samples/<name>/step-N.png)
    - score(modules, config, batch) -> {score name: per-sample tensor [B]} (optional:
      anomaly scores for `gentrain score`; lower = more typical)
    - validate(config, spec) -> [problem, ...] (optional: rules that span the family's
      config and the rest of the spec, reported by `gentrain validate`)
    - summarize(means) -> {metric: float} (optional: metrics that are functions of the
      held-out means rather than means themselves, e.g. perplexity = exp(mean NLL);
      computed once from evaluate's averages over every batch and rank)

    Declarations:
    - config: the hyperparameter dataclass (the spec's `job.config`)
    - sampler: the sampler settings dataclass (the spec's `job.sampling`; every field
      with a default); NoSettings when there are none
    - likelihoods: {evaluate metric: unit} for the metrics that are log-likelihoods or
      bounds on them, unit one of LIKELIHOOD_UNITS (what `gentrain eval --metrics nll` reports)
    - generative: False when `sample` draws no samples of the data distribution (a
      classifier's class visualisations): sample metrics (FID, ...) are refused
    - class_conditional: True when `sample` honours request.labels (`gentrain sample --labels`)
    - data_kinds: the DataInfo kinds it trains on ("image", "tokens", "vector")
    - supports: the (strategy, precision, ZeRO stage) combinations it trains under
    """

    name: str
    config: type
    build: Callable[[Any, DataInfo], dict[str, "torch.nn.Module"]]
    train_step: Callable[[Any, dict], dict[str, float]]
    sample: Callable[[dict, Any, SampleRequest], "torch.Tensor"]
    evaluate: Callable[[dict, Any, dict, "torch.Generator"], dict[str, float]] | None = None
    optimizers: Callable | None = None
    visuals: Callable[[dict, Any, dict, "torch.Generator"], dict[str, "torch.Tensor"]] | None = None
    score: Callable[[dict, Any, dict], dict[str, "torch.Tensor"]] | None = None
    validate: Callable[[Any, "JobSpec"], list[str]] | None = None
    summarize: Callable[[Mapping[str, float]], dict[str, float]] | None = None
    sampler: type = NoSettings
    likelihoods: Mapping[str, str] = field(default_factory=dict)
    generative: bool = True
    class_conditional: bool = False
    data_kinds: tuple[str, ...] = ("image",)
    supports: Supports = field(default_factory=Supports)
    spec_dir: str | None = None
    description: str = ""

    def __post_init__(self):
        wrong = {metric: unit for metric, unit in self.likelihoods.items() if unit not in LIKELIHOOD_UNITS}
        if wrong:
            raise ValueError(f"job type {self.name!r}: likelihoods {wrong} use units outside "
                             f"{', '.join(LIKELIHOOD_UNITS)}")
        if self.likelihoods and self.evaluate is None:
            raise ValueError(f"job type {self.name!r} declares likelihoods but no evaluate() to compute them")
        unknown = [kind for kind in self.data_kinds if kind not in BATCH_KEYS]
        if unknown:
            raise ValueError(f"job type {self.name!r}: data_kinds {unknown} are not among {', '.join(BATCH_KEYS)}")

    def parse_config(self, mapping: Any, problems: list[str]) -> Any:
        """This family's config dataclass from the spec's `job.config` (None if it is invalid:
        every problem appended, named by its YAML path)."""
        return build(self.config, mapping, "job.config", problems)

    def parse_sampler(self, mapping: Any, problems: list[str]) -> Any:
        """This family's sampler settings from the spec's `job.sampling` (None if invalid)."""
        return build(self.sampler, mapping, "job.sampling", problems)

    def rate_settings(self, spec: "JobSpec", problems: list[str]) -> dict[str, Any]:
        """eval.sampler_rates: {name: this family's sampler settings (job.sampling with the
        named changes on top)}; problems named `eval.sampler_rates.<name>.<key>`."""
        settings = {}
        for name, changes in (spec.eval.sampler_rates or {}).items():
            path = f"eval.sampler_rates.{name}"
            if not re.fullmatch(r"[\w.\-]+", str(name)):
                problems.append(f"{path}: name the setting with letters, digits, _, . or - only "
                                f"(it becomes the MLflow metric sample/<name>/samples_per_second)")
                continue
            if not isinstance(changes, dict):
                problems.append(f"{path}: expected a mapping of sampler settings, e.g. {{steps: 50}}")
                continue
            parsed = build(self.sampler, {**(spec.job.sampling or {}), **changes}, path, problems)
            if parsed is not None:
                settings[str(name)] = parsed
        return settings

    def check(self, spec: "JobSpec") -> list[str]:
        """Problems with running this family under the spec's strategy and precision: the
        one reading of `supports` (`gentrain validate`, the engine's callers and the strategy
        matrix's combinations all come from it)."""
        problems = []
        strategy, precision = spec.strategy.name, spec.strategy.precision
        if strategy not in self.supports.strategies:
            problems.append(f"strategy.name: {strategy!r} is not supported by job type "
                            f"{self.name!r}; use one of {', '.join(self.supports.strategies)}")
        if precision not in self.supports.precisions:
            problems.append(f"strategy.precision: {precision!r} is not supported by job type "
                            f"{self.name!r}; use one of {', '.join(self.supports.precisions)}")
        reason = self.supports.exclusion(strategy, precision)
        if reason is not None:
            problems.append(f"strategy.precision: {precision!r} under strategy.name={strategy} does "
                            f"not run the {self.name} job type: {reason}")
        stage = spec.strategy.zero_stage
        if strategy == "deepspeed" and stage not in self.supports.zero_stages:
            problems.append(f"strategy.zero_stage: {stage} is not supported by job type {self.name!r}; "
                            f"use one of {', '.join(map(str, self.supports.zero_stages))}")
        return problems

    def check_data(self, data: DataInfo) -> None:
        """Raise if this family does not train on `data`'s kind of sample."""
        if data.kind not in self.data_kinds:
            raise ValueError(f"job type {self.name!r} trains on {' or '.join(self.data_kinds)} data; "
                             f"data.source holds {data.kind} samples of shape {list(data.shape)}")


class UnknownJobType(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class Registry:
    """Name -> JobType. Registering a name twice is an error, never a silent override."""

    def __init__(self) -> None:
        self._types: dict[str, JobType] = {}
        self._origins: dict[str, str] = {}

    def register(self, job_type: JobType, origin: str = "code") -> None:
        if not isinstance(job_type, JobType):
            raise TypeError(f"{origin}: expected a gentrain.registry.JobType, got {type(job_type).__name__}")
        if job_type.name in self._types:
            raise ValueError(f"job type {job_type.name!r} is registered twice "
                             f"({self._origins[job_type.name]} and {origin}); rename one of them")
        self._types[job_type.name] = job_type
        self._origins[job_type.name] = origin

    def get(self, name: str) -> JobType:
        if name not in self._types:
            known = ", ".join(sorted(self._types)) or "none"
            close = difflib.get_close_matches(name, list(self._types), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownJobType(f"unknown job type {name!r}{hint} (known: {known})")
        return self._types[name]

    def all(self) -> dict[str, JobType]:
        return dict(self._types)

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for entry_point in importlib.metadata.entry_points(group=group):
            job_type = entry_point.load()
            if job_type.name != entry_point.name:
                raise ValueError(f"entry point {entry_point.name!r} ({entry_point.value}) "
                                 f"points at job type named {job_type.name!r}; make them match")
            self.register(job_type, origin=f"entry point {entry_point.value}")


_default: Registry | None = None
_lock = threading.Lock()


def default_registry() -> Registry:
    global _default
    with _lock:
        if _default is None:
            registry = Registry()
            registry.load_entry_points()
            _default = registry
    return _default


def get_job_type(name: str) -> JobType:
    return default_registry().get(name)


def job_types() -> dict[str, JobType]:
    return default_registry().all()


def job_config(spec: "JobSpec", evaluation_changes: list[str] | None = None) -> Any:
    """The job type's config dataclass of a spec (validated by gentrain.validation, or read
    from a checkpoint that was); raise SpecError if `job.config` does not fit it.
    `evaluation_changes`: "key=value" changes (`gentrain eval --config`) of the fields marked
    `evaluation` (they change how a trained model is evaluated, never the network); any other
    key is refused by name."""
    import dataclasses

    from gentrain.spec import apply_overrides, parse_overrides

    job = get_job_type(spec.job.type)
    mapping = spec.job.config
    if evaluation_changes:
        allowed = sorted(f.name for f in dataclasses.fields(job.config) if f.metadata.get("evaluation"))
        for keys, _ in parse_overrides(list(evaluation_changes)):
            if ".".join(keys) not in allowed:
                raise SpecError([f"--config {'.'.join(keys)}: job.config.{'.'.join(keys)} is not an evaluation "
                                 f"setting of job type {job.name!r} (it shapes the trained model); "
                                 f"evaluation settings: {', '.join(allowed) or 'none'}"])
        mapping = apply_overrides(dict(mapping or {}), list(evaluation_changes))
    problems: list[str] = []
    config = job.parse_config(mapping, problems)
    if problems:
        raise SpecError(problems)
    return config


def sampler_settings(spec: "JobSpec", overrides: list[str] | None = None) -> Any:
    """The job type's sampler settings: the spec's `job.sampling` with `overrides`
    ("key=value", as `gentrain sample --set temperature=0.8` gives them) on top; SpecError
    naming `job.sampling.<key>` if any does not fit."""
    from gentrain.spec import apply_overrides

    mapping = dict(spec.job.sampling or {})
    if overrides:
        mapping = apply_overrides(mapping, list(overrides))
    problems: list[str] = []
    settings = get_job_type(spec.job.type).parse_sampler(mapping, problems)
    if problems:
        raise SpecError(problems)
    return settings
