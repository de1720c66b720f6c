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
                   sample=lambda m, c, request: None)


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


def test_data_info_kinds_fix_the_batch_keys():
    from gentrain.registry import BATCH_KEYS, DataInfo, batch_inputs

    assert BATCH_KEYS == {"image": ("image", "label"), "tokens": ("tokens",), "vector": ("x", "label")}
    vector = DataInfo((2,), kind="vector")
    assert vector.input_key == "x" and DataInfo.from_dict(vector.to_dict()) == vector
    assert DataInfo.from_dict({"shape": [1, 8, 8], "num_classes": 10}) == DataInfo((1, 8, 8), 10)  # older checkpoints
    assert batch_inputs({"x": "points", "label": 0}) == "points"
    with pytest.raises(ValueError, match="data kind 'audio' is not one of image, tokens, vector"):
        DataInfo((16000,), kind="audio")
    with pytest.raises(ValueError, match="job type 'vae' trains on image data; data.source holds vector samples"):
        get_job_type("vae").check_data(vector)
    get_job_type("gan").check_data(vector)  # its MLP trains on vectors


def test_likelihoods_are_declared_with_known_units():
    with pytest.raises(ValueError, match=r"likelihoods \{'nll': 'bits'\} use units outside nats, bits/dim"):
        JobType(name="toy", config=_Config, build=lambda c, d: {}, train_step=lambda ctx, b: {},
                sample=lambda m, c, r: None, evaluate=lambda m, c, b, g: {}, likelihoods={"nll": "bits"})
    assert get_job_type("vae").likelihoods["nll_bits_per_dim"] == "bits/dim"
    assert not get_job_type("classifier").generative and get_job_type("gan").generative


def test_sampler_settings_come_from_job_sampling_and_are_validated():
    from gentrain.registry import sampler_settings
    from gentrain.schema import SpecError
    from gentrain.validation import load_spec

    spec = load_spec("gan/debug", ["job.sampling.truncation=1.5"])
    assert sampler_settings(spec).truncation == 1.5
    assert sampler_settings(spec, ["truncation=0.5"]).truncation == 0.5  # gentrain sample --set
    with pytest.raises(SpecError) as caught:
        load_spec("vae/debug", ["job.sampling.temperature=-1"])
    assert "job.sampling.temperature: -1.0 must be > 0" in str(caught.value)
