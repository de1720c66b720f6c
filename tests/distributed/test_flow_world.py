"""The flow job type's ActNorm data-dependent initialisation at world size 2 (gloo): each
rank draws a different first batch, and after the first step every rank holds the same
statistics, those of the union of both ranks' batches, under DDP, DeepSpeed ZeRO 1 and 3,
Accelerate and FSDP2 (ZeRO-3 and FSDP2 shard parameters; the statistics are buffers, which
both leave whole).
A second step never initialises again, nor does a run restored from a checkpoint.
"""

import dataclasses

import pytest
import torch

from harness import run_world

WORLD = 2
SECTIONS = {"ddp": {"name": "ddp"}, "zero1": {"name": "deepspeed", "zero_stage": 1},
            "zero3": {"name": "deepspeed", "zero_stage": 3}, "accelerate": {"name": "accelerate"},
            "fsdp": {"name": "fsdp"}}


def buffers(actnorms) -> list:
    return [(a.init_bias.float().flatten().clone(), a.init_log_scale.float().flatten().clone(), int(a.initialized))
            for a in actnorms]


def first_actnorm_statistics(rank: int, world: int, section: dict, directory: str) -> dict:
    from gentrain.engine import Engine
    from gentrain.registry import DataInfo
    from gentrain.validation import from_dict
    from gentrain_jobs.flow.layers import ActNorm

    spec = from_dict({"job": {"type": "flow", "config": {"levels": 2, "steps_per_level": 2, "hidden": 8}},
                      "train": {"steps": 10, "batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-3}}})
    spec = dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, **section))
    engine = Engine(spec, rank=rank, world_size=world, data_info=DataInfo((1, 8, 8)), print_fn=None)
    model = engine.strategy.unwrap("flow")
    actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
    inputs = []
    hook = actnorms[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    scale = 1.0 + rank  # and differently spread
    batches = iter(lambda: {"image": (torch.rand(8, 1, 8, 8, generator=data) * scale).clamp(0, 1)}, None)
    engine.optimizer_step(batches)
    after_first = buffers(actnorms)
    engine.optimizer_step(batches)
    after_second = buffers(actnorms)
    hook.remove()
    engine.save(directory)
    # A restart: fresh networks (uninitialised ActNorms), the checkpoint restored, then a step.
    restored = Engine(spec, rank=rank, world_size=world, data_info=DataInfo((1, 8, 8)), print_fn=None)
    restored.restore(directory)
    restored_actnorms = [m for m in restored.strategy.unwrap("flow").modules() if isinstance(m, ActNorm)]
    after_restore = buffers(restored_actnorms)
    restored.optimizer_step(batches)
    return {"first_input": inputs[0].float(), "after_first": after_first, "after_second": after_second,
            "after_restore": after_restore, "after_resumed_step": buffers(restored_actnorms)}


def every_section(rank: int, world: int, directory: str) -> dict:
    return {label: first_actnorm_statistics(rank, world, section, f"{directory}/{label}")
            for label, section in SECTIONS.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):  # [rank 0's, rank 1's]
    return run_world(every_section, WORLD, args=(str(tmp_path_factory.mktemp("flow-world")),), timeout=600)


@pytest.mark.parametrize("label", sorted(SECTIONS))
def test_every_rank_initialises_actnorm_with_the_moments_of_all_first_batches(results, label):
    first, second = (rank_results[label] for rank_results in results)
    assert not torch.equal(first["first_input"], second["first_input"])  # the ranks saw different data
    for (bias_a, log_scale_a, flag_a), (bias_b, log_scale_b, flag_b) in zip(first["after_first"], second["after_first"]):
        assert flag_a == flag_b == 1
        torch.testing.assert_close(bias_a, bias_b, rtol=0, atol=0)
        torch.testing.assert_close(log_scale_a, log_scale_b, rtol=0, atol=0)
    union = torch.cat([first["first_input"], second["first_input"]]).transpose(0, 1).flatten(1).double()
    std, mean = torch.std_mean(union, dim=1, unbiased=False)
    bias, log_scale, _ = first["after_first"][0]
    torch.testing.assert_close(bias.double(), -mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(log_scale.double(), -torch.log(std + 1e-6), rtol=0, atol=1e-6)
    for rank_results in results:  # the second step, the restore and a step after it kept them
        first_step = rank_results[label]["after_first"]
        for later in ("after_second", "after_restore", "after_resumed_step"):
            for (bias, log_scale, _), (bias2, log_scale2, flag) in zip(first_step, rank_results[label][later]):
                assert flag == 1, later
                assert torch.equal(bias, bias2) and torch.equal(log_scale, log_scale2), later
