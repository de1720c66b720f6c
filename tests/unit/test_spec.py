"""Spec loading, overrides and validation: every problem at once, each naming its path."""

import pytest
import yaml

from gentrain.schema import SpecError
from gentrain.spec import JobSpec, apply_overrides, parse_overrides
from gentrain.validation import bundled_specs, find_spec_file, from_dict, load_spec


VAE = {"job": {"type": "vae"}}  # every spec names its job type


def problems_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        from_dict({**VAE, **data})
    return info.value.problems


def test_bundled_debug_spec_loads_with_defaults_filled():
    spec = load_spec("vae/debug")
    assert isinstance(spec, JobSpec)
    assert spec.name == "vae-debug"
    assert spec.job.type == "vae"
    assert spec.scaling.num_workers == 2
    assert spec.job.config["likelihood"] == "bernoulli"
    assert spec.job.config["beta"] == 1.0  # default filled in from the job's config
    assert spec.storage_path.startswith("/")  # resolved on the driver for Ray workers


def test_overrides_are_yaml_scalars_at_dotted_paths():
    spec = load_spec("vae/debug", ["train.steps=200", "scaling.num_workers=1",
                                   "train.optimizer.lr=3e-4", "strategy.grad_checkpointing=true",
                                   "job.config.beta=4"])
    assert spec.train.steps == 200
    assert spec.scaling.num_workers == 1
    assert spec.train.optimizer.lr == pytest.approx(3e-4)
    assert spec.strategy.grad_checkpointing is True
    assert spec.job.config["beta"] == 4.0


def test_override_creates_missing_sections_and_rejects_malformed():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(SpecError, match="expected key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(SpecError, match="expected key=value"):
        parse_overrides(["train..steps=3"])


def test_every_problem_reported_at_once_with_paths_values_and_fixes():
    problems = problems_of({
        "scaling": {"num_workers": -1},
        "train": {"optimzer": {"lr": 1}, "steps": "abc"},
        "strategy": {"precision": "fp8"},
        "job": {"type": "vae", "config": {"latnt_dim": 3, "likelihood": "poisson"}},
    })
    assert "scaling.num_workers: -1 must be >= 1" in problems
    assert "train.optimzer: unknown key; did you mean 'optimizer'?" in problems
    assert "train.steps: 'abc' is not int" in problems
    assert "strategy.precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'" in problems
    assert "job.config.latnt_dim: unknown key; did you mean 'latent_dim'?" in problems
    assert "job.config.likelihood: 'poisson' is not one of 'bernoulli', 'gaussian', 'logistic'" in problems
    assert len(problems) == 6


def test_error_message_lists_problems():
    with pytest.raises(SpecError) as info:
        from_dict({**VAE, "train": {"batch_size": 0}}, source="my.yaml")
    text = str(info.value)
    assert text.startswith("my.yaml has 1 problem:")
    assert "train.batch_size: 0 must be >= 1 (samples per worker per step)" in text


def test_unknown_key_far_from_any_lists_known_keys():
    problems = problems_of({"zzz": 1})
    assert problems[0].startswith("zzz: unknown key; known keys: ")
    assert "storage_path" in problems[0]


def test_bool_is_not_an_int_and_numeric_strings_are_floats():
    assert "train.steps: True is not int" in problems_of({"train": {"steps": True}})
    spec = from_dict({**VAE, "train": {"optimizer": {"lr": "1e-3"}}})  # YAML 1.1 reads 1e-3 as str
    assert spec.train.optimizer.lr == 1e-3


def test_cross_field_rules_name_the_fix():
    problems = problems_of({"scaling": {"resources_per_worker": {"GPU": 1}}})
    assert any("scaling.use_gpu=true" in p for p in problems)
    problems = problems_of({"strategy": {"precision": "fp16"}})
    assert any("use strategy.precision=bf16" in p for p in problems)
    problems = problems_of({"train": {"steps": 10, "schedule": {"warmup_steps": 10}}})
    assert any(p.startswith("train.schedule.warmup_steps: 10 must be < train.steps") for p in problems)
    problems = problems_of({"name": "a/b"})
    assert any(p.startswith("name: 'a/b'") for p in problems)


def test_strategy_not_supported_by_the_job_type_is_a_validate_error():
    from gentrain.registry import get_job_type

    spec = from_dict(VAE)
    spec.strategy.name = "megatron"  # bypasses the Literal check to reach the job's own
    assert get_job_type("vae").check(spec) == [
        "strategy.name: 'megatron' is not supported by job type 'vae'; use one of ddp, deepspeed, accelerate, fsdp"]


def test_strategy_options_for_another_strategy_are_errors():
    problems = problems_of({"strategy": {"name": "ddp", "zero_stage": 2, "accelerate_mode": "fsdp"}})
    assert any(p.startswith("strategy.zero_stage: only applies to strategy.name=deepspeed") for p in problems)
    assert any(p.startswith("strategy.accelerate_mode: only applies to strategy.name=accelerate") for p in problems)
    problems = problems_of({"strategy": {"name": "accelerate", "accelerate_mode": "fsdp"}})
    assert any("'fsdp' is not supported yet" in p for p in problems)


def test_unknown_job_type_lists_known_ones():
    from gentrain.registry import job_types

    problems = problems_of({"job": {"type": "vea"}})
    known = ", ".join(sorted(job_types()))
    assert "classifier, " in known and "vae" in known
    assert problems == [f"job.type: unknown job type 'vea'; did you mean 'vae'? (known: {known})"]


def test_spec_file_must_be_safe_yaml(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(path))


def test_spec_file_from_disk_round_trips(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", **VAE, "train": {"steps": 7}}))
    spec = load_spec(str(path), ["train.batch_size=3"])
    assert (spec.name, spec.train.steps, spec.train.batch_size) == ("mine", 7, 3)
    again = from_dict(spec.to_dict())
    assert again == spec


def test_unknown_spec_name_lists_bundled_specs():
    assert "vae/debug" in bundled_specs()
    with pytest.raises(FileNotFoundError, match=r"bundled specs: .*vae/debug"):
        find_spec_file("vae/nope")


def test_deepspeed_config_conflicts_are_validate_errors():
    problems = problems_of({"strategy": {"name": "deepspeed", "zero_stage": 2,
                                         "deepspeed_config": {"gradient_clipping": 0.5}}})
    assert len(problems) == 1 and problems[0].startswith("strategy.deepspeed_config.gradient_clipping")
    assert "train.grad_clip" in problems[0]
    spec = from_dict({**VAE, "strategy": {"name": "deepspeed", "deepspeed_config": {"wall_clock_breakdown": True}}})
    assert spec.strategy.deepspeed_config == {"wall_clock_breakdown": True}
