"""The job-type registry: entry points, duplicates, unknown names."""

import importlib.metadata
from dataclasses import dataclass

import pytest

from gentrain.registry import ENTRY_POINT_GROUP, JobType, Registry, UnknownJobType, get_job_type


@dataclass
class _Config:
    width: int = 4


def _job(name: str) -> JobType:
    return JobType(name=name, config=_Config, build=lambda c, d: {}, train_step=lambda ctx, b: {},
                   sample=lambda m, n, g: None)


def test_vae_is_registered_through_its_entry_point():
    names = [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    assert "vae" in names
    assert get_job_type("vae").name == "vae"


def test_registering_a_name_twice_raises_naming_both_origins():
    registry = Registry()
    registry.register(_job("toy"), origin="package a")
    with pytest.raises(ValueError, match=r"'toy' is registered twice \(package a and package b\)"):
        registry.register(_job("toy"), origin="package b")


def test_unknown_name_lists_the_known_ones():
    registry = Registry()
    registry.register(_job("toy"))
    registry.register(_job("gan"))
    with pytest.raises(UnknownJobType) as info:
        registry.get("tyo")
    assert str(info.value) == "unknown job type 'tyo'; did you mean 'toy'? (known: gan, toy)"


def test_only_job_types_register():
    with pytest.raises(TypeError, match="expected a gentrain.registry.JobType"):
        Registry().register(object(), origin="x")


def test_declared_combinations_expand_zero_stages_and_drop_exclusions():
    from gentrain.registry import Supports

    supports = Supports(strategies=("ddp", "deepspeed"), precisions=("fp32", "bf16"), zero_stages=(1, 3),
                        excluded=(("deepspeed", "bf16", "not yet"),))
    assert [str(c) for c in supports.combinations()] == [
        "ddp-fp32", "ddp-bf16", "deepspeed-zero1-fp32", "deepspeed-zero3-fp32"]
    assert supports.combinations()[3].overrides == [
        "strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.precision=fp32"]


def test_validation_refuses_what_a_job_type_excludes_with_its_reason():
    from gentrain.schema import SpecError
    from gentrain.validation import load_spec

    with pytest.raises(SpecError) as caught:
        load_spec("gan/debug", ["strategy.name=deepspeed", "strategy.precision=bf16"])
    assert ("strategy.precision: 'bf16' under strategy.name=deepspeed does not run the gan job type: "
            "DeepSpeed keeps batch-norm buffers in fp32") in str(caught.value)
    for combo in get_job_type("gan").supports.combinations():  # every declared one validates
        if combo.precision != "fp16":  # needs GPU workers
            load_spec("gan/debug", combo.overrides)
