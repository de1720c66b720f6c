"""Validation: every check a spec must pass before it runs, in one place, once, on the driver.

    gentrain validate vae/debug train.steps=200 scaling.num_workers=1

`gentrain.spec` checks a spec on its own (types, bounds, rules between its fields). This
layer adds what needs the rest of gentrain or this machine:

- the job type (the registry): its config, the (strategy, precision, ZeRO stage)
  combinations it declares, its own cross-field rules;
- the strategies: `strategy.deepspeed_config` conflicts, fp16 and FSDP limits;
- evaluation: metric names, the extractor, metric settings against `eval.fid_samples`;
- names, local paths and secrets (`gentrain.spec_checks`);
- in `load_job` only, this machine: a writable storage folder, the Inception weights.

It also resolves what depends on the driver's working folder (a relative storage_path or
classifier extractor), since Ray workers run elsewhere. The result, a `ValidatedJob` (the
spec and its job type's config), is what the launcher hands to the workers, which never
validate again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gentrain.optim import implementation_problem
from gentrain.paths import is_remote
from gentrain.redaction import describe
from gentrain.registry import UnknownJobType, get_job_type, job_types
from gentrain.schema import SpecError, to_dict
from gentrain.spec import EvalSection, JobSpec, apply_overrides, build_spec, read_yaml
from gentrain.spec_checks import check_storage, expand_user, spec_problems
from gentrain.strategies.limits import fp16_problem, fsdp_problem, nonfinite_problem


@dataclass(frozen=True)
class ValidatedJob:
    """A spec that passed every check, and its job type's config dataclass (defaults filled
    in). Plain picklable dataclasses: Ray hands them to the workers as they are."""

    spec: JobSpec
    config: Any


def validate(data: Any, source: str = "spec") -> ValidatedJob:
    """Check a spec mapping with everything that needs no more than this process; raise
    SpecError listing every problem, each named by its YAML path."""
    problems: list[str] = []
    spec = build_spec(data, problems)
    config = None
    if spec is not None:
        problems += spec_problems(spec)  # name, local paths, secrets
        problems += strategy_problems(spec)
        problems += eval_problems(spec.eval)
        config = _job_type_problems(spec, problems)
    if problems:
        raise SpecError(problems, source)
    _resolve_on_driver(spec)
    return ValidatedJob(spec, config)


def load_job(ref: str, overrides: list[str] | None = None) -> ValidatedJob:
    """Find, read, override and validate a spec, then check this machine can run it: the
    storage folder is writable (before Ray or MLflow start) and eval weights exist."""
    path = find_spec_file(ref)
    data = apply_overrides(read_yaml(path), overrides or [])
    return check_job(data, source=str(path))


def check_job(data: Any, source: str = "spec") -> ValidatedJob:
    """`validate` and this machine's checks (storage, eval weights): what `gentrain run`
    asks of a spec mapping before it runs, and `gentrain sweep` of every trial's."""
    job = validate(data, source=source)
    problems = environment_problems(job.spec)
    if problems:
        raise SpecError(problems, source)
    return job


def load_spec(ref: str, overrides: list[str] | None = None) -> JobSpec:
    """`load_job(...).spec`: for callers that need the spec alone."""
    return load_job(ref, overrides).spec


def from_dict(data: Any, source: str = "spec") -> JobSpec:
    """`validate(...).spec`: for callers that need the spec alone."""
    return validate(data, source).spec


# -- the checks -----------------------------------------------------------------------------
def _job_type_problems(spec: JobSpec, problems: list[str]) -> Any:
    """Append the job type's problems; its config (None if the type or config is invalid)."""
    try:
        job_type = get_job_type(spec.job.type)
    except UnknownJobType as exc:
        problems.append(f"job.type: {exc}")
        return None
    config = job_type.parse_config(spec.job.config, problems)
    if config is None:
        return None
    spec.job.config = to_dict(config)  # resolved: defaults filled in
    sampling = job_type.parse_sampler(spec.job.sampling, problems)
    if sampling is not None:
        spec.job.sampling = to_dict(sampling)
        job_type.rate_settings(spec, problems)  # eval.sampler_rates: each over the resolved job.sampling
    problems += job_type.check(spec)
    if job_type.validate is not None:
        problems += job_type.validate(config, spec)
    return config


def strategy_problems(spec: JobSpec) -> list[str]:
    """What the strategies would refuse at start-up, reported before anything starts."""
    strategy = spec.strategy
    problems = [fp16_problem(strategy.precision, spec.scaling.use_gpu)]
    if strategy.name == "accelerate":
        problems.append(fsdp_problem(strategy.accelerate_mode, spec.scaling.use_gpu))
    problems.append(nonfinite_problem(spec.train.nonfinite, spec.run_dir))
    problems.append(implementation_problem(spec.train.optimizer, strategy.name))
    problems = [problem for problem in problems if problem]
    if strategy.name == "deepspeed" and strategy.deepspeed_config:
        from gentrain.strategies.base import StepSettings
        from gentrain.strategies.deepspeed import deepspeed_config

        try:  # conflicts with gentrain's own settings surface here, not on the workers
            deepspeed_config(strategy, StepSettings.from_train(spec.train), spec.scaling.num_workers)
        except SpecError as exc:
            problems += exc.problems
    return problems


def eval_problems(section: EvalSection) -> list[str]:
    """Sample metrics, the extractor and the metric settings against eval.fid_samples."""
    from gentrain.evaluation.extractors import check_extractor_choice
    from gentrain.metrics.settings import SPEC_NAMES, MetricSettings
    from gentrain.metrics.summary import SAMPLE_METRICS

    problems = []
    unknown = [name for name in section.metrics if name not in SAMPLE_METRICS]
    if unknown:
        problems.append(f"eval.metrics: unknown {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(SAMPLE_METRICS)} (likelihoods come from the job type's evaluate)")
    problem = check_extractor_choice(section.extractor)
    if problem:
        problems.append(f"eval.extractor: {problem}")
    return problems + MetricSettings.of_spec(section).problems(section.metrics, section.fid_samples,
                                                               SPEC_NAMES, bounds_checked=True)


def environment_problems(spec: JobSpec) -> list[str]:
    """What this machine lacks for the spec (not asked of a checkpoint's or a cluster's spec)."""
    problems = []
    if spec.eval.metrics and spec.eval.extractor == "inception":
        from gentrain.metrics.inception_weights import InceptionWeightsNotFoundError, resolve_weights_path

        try:
            resolve_weights_path(spec.eval.inception_weights)
        except InceptionWeightsNotFoundError as error:
            problems.append(f"eval.inception_weights: {error}")
    return problems + check_storage(spec)


def _resolve_on_driver(spec: JobSpec) -> None:
    """Ray workers run in another cwd: relative folders are resolved here, on the driver."""
    if not is_remote(spec.storage_path):
        spec.storage_path = str(Path(expand_user("storage_path", spec.storage_path)[0]).resolve())
    prefix = "classifier:"
    reference = spec.eval.extractor[len(prefix):]
    if spec.eval.extractor.startswith(prefix) and os.path.exists(os.path.expanduser(reference)):
        spec.eval.extractor = prefix + os.path.abspath(os.path.expanduser(reference))


# -- named specs ----------------------------------------------------------------------------
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
    names = []
    for type_name, job_type in sorted(job_types().items()):
        if job_type.spec_dir is not None and Path(job_type.spec_dir).is_dir():
            names += [f"{type_name}/{p.stem}" for p in sorted(Path(job_type.spec_dir).glob("*.yaml"))]
    return names
