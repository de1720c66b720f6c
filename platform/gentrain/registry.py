"""Job types (model families) and how the platform finds them.

A job type is a small frozen dataclass of builders. A package makes one known by an
entry point in the group `gentrain.jobs`, exactly as the built-in ones do:

    [project.entry-points."gentrain.jobs"]
    my_family = "my_package.family:JOB"

The core never imports a family by name; it asks this registry.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from gentrain.schema import SpecError, build

if TYPE_CHECKING:
    import torch

    from gentrain.spec import JobSpec

ENTRY_POINT_GROUP = "gentrain.jobs"


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about its data to build networks."""

    shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28)
    num_classes: int = 0


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
    """

    strategies: tuple[str, ...] = ("ddp",)
    precisions: tuple[str, ...] = ("fp32", "bf16")
    zero_stages: tuple[int, ...] = ZERO_STAGES  # with strategy.name=deepspeed
    excluded: tuple[tuple[str, str, str], ...] = ()

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
    """A model family: builders the training loop calls, and nothing else.

    - build(config, data_info) -> {name: nn.Module}
    - train_step(ctx, batch) -> {metric: float}; calls ctx.backward(loss, name) and
      ctx.step(name) as often and in whatever order the family needs.
    - sample(modules, n, generator) -> Tensor in data space ([0, 1] for images)
    - evaluate(modules, batch) -> {metric: per-sample mean} (optional)
    - optimizers(config, modules, make_optimizer) -> {name: Optimizer} (optional;
      default: one optimizer per module, from the spec's train.optimizer;
      make_optimizer(params, lr=None, betas=None) uses the spec's settings unless given)
    - visuals(modules, batch, generator) -> {name: images [N, C, H, W] in [0, 1]}
      (optional: extra grids such as reconstructions or latent traversals, saved at
      every evaluation as samples/<name>/step-N.png)
    - score(modules, batch) -> {score name: per-sample tensor [B]} (optional: anomaly
      scores for `gentrain score`; lower = more typical)
    - validate(config, spec) -> [problem, ...] (optional: rules that span the family's
      config and the rest of the spec, reported by `gentrain validate`)
    """

    name: str
    config: type
    build: Callable[[Any, DataInfo], dict[str, "torch.nn.Module"]]
    train_step: Callable[[Any, dict], dict[str, float]]
    sample: Callable[[dict, int, "torch.Generator"], "torch.Tensor"]
    evaluate: Callable[[dict, dict], dict[str, float]] | None = None
    optimizers: Callable | None = None
    visuals: Callable[[dict, dict, "torch.Generator"], dict[str, "torch.Tensor"]] | None = None
    score: Callable[[dict, dict], dict[str, "torch.Tensor"]] | None = None
    validate: Callable[[Any, "JobSpec"], list[str]] | None = None
    supports: Supports = field(default_factory=Supports)
    spec_dir: str | None = None
    description: str = ""

    def parse_config(self, mapping: Any, problems: list[str]) -> Any:
        """This family's config dataclass from the spec's `job.config` (None if it is invalid:
        every problem appended, named by its YAML path)."""
        return build(self.config, mapping, "job.config", problems)

    def check(self, spec: "JobSpec") -> list[str]:
        """Problems with running this family under the spec's strategy and precision."""
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


def job_config(spec: "JobSpec") -> Any:
    """The job type's config dataclass of a spec (validated by gentrain.validation, or read
    from a checkpoint that was); raise SpecError if `job.config` does not fit it."""
    problems: list[str] = []
    config = get_job_type(spec.job.type).parse_config(spec.job.config, problems)
    if problems:
        raise SpecError(problems)
    return config
