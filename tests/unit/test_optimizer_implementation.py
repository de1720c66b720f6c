"""train.optimizer.implementation: what auto picks under each strategy, that every
implementation makes the same update, and that a resume may change it.

    .venv/bin/pytest tests/unit/test_optimizer_implementation.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

from gentrain.optim import implementation_kwargs, make_optimizer
from gentrain.schema import SpecError
from gentrain.spec import OptimizerSection
from gentrain.validation import load_job


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((7, 5), (5,), (3, 3, 2))]


def test_auto_is_fused_where_the_optimizer_sees_whole_parameters():
    section = OptimizerSection()
    params = _params()
    assert implementation_kwargs(section, "ddp", params) == {"fused": True}
    assert implementation_kwargs(section, "accelerate", params) == {"fused": True}
    assert implementation_kwargs(section, "deepspeed", params) == {}
    assert implementation_kwargs(section, "fsdp", params) == {}
    assert implementation_kwargs(section, None, params) == {}
    # A parameter torch has no fused kernel for (an integer buffer passed by mistake, a
    # device without one) leaves the choice to torch.
    assert implementation_kwargs(section, "ddp", params + [torch.zeros(3, dtype=torch.int64)]) == {}
    assert implementation_kwargs(OptimizerSection(implementation="for_loop"), "ddp", params) == {"foreach": False}
    optimizer = make_optimizer(params, section, "ddp")
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_every_implementation_makes_the_same_update(name):
    """Ten steps of each implementation from the same weights and gradients agree to float
    rounding (fused kernels may order the arithmetic differently)."""
    results = {}
    for implementation in ("for_loop", "foreach", "fused"):
        params = _params()
        section = OptimizerSection(name=name, lr=1e-2, weight_decay=0.1, implementation=implementation)
        optimizer = make_optimizer(params, section, "ddp")
        generator = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        results[implementation] = [p.detach().clone() for p in params]
        start = _params()
        assert any(not torch.equal(a, b) for a, b in zip(results[implementation], start))  # it moved
    for implementation in ("foreach", "fused"):
        for got, want in zip(results[implementation], results["for_loop"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_state_saved_by_one_implementation_continues_in_another():
    """The moments and step count are the same state: a checkpoint written with the
    default per-tensor loop continues under fused (a resume after an upgrade) as it would
    have continued under the loop."""
    section = OptimizerSection(lr=1e-2)
    params = _params()
    loop = make_optimizer(params, OptimizerSection(lr=1e-2, implementation="for_loop"), "ddp")
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        loop.step()
    state, weights = loop.state_dict(), [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=generator) for p in params]

    def continue_with(implementation):
        fresh = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = make_optimizer(fresh, OptimizerSection(lr=1e-2, implementation=implementation), "ddp")
        optimizer.load_state_dict(copy.deepcopy(state))  # load_state_dict keeps the moments' tensors
        for p, g in zip(fresh, grads):
            p.grad = g.clone()
        optimizer.step()
        return fresh

    for got, want in zip(continue_with("fused"), continue_with("for_loop")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert section.implementation == "auto"


def test_an_explicit_fast_implementation_is_refused_where_the_strategy_chooses(tmp_path):
    with pytest.raises(SpecError) as error:
        load_job("vae/debug", [f"storage_path={tmp_path}", "strategy.name=deepspeed",
                               "train.optimizer.implementation=fused"])
    message = str(error.value)
    assert "train.optimizer.implementation: fused is for strategy.name ddp or accelerate" in message
    assert "use auto" in message
    load_job("vae/debug", [f"storage_path={tmp_path}", "strategy.name=deepspeed"])  # auto passes
    with pytest.raises(SpecError, match="train.optimizer.implementation"):
        load_job("vae/debug", [f"storage_path={tmp_path}", "train.optimizer.implementation=turbo"])


def test_a_loaded_checkpoint_keeps_this_runs_implementation():
    """The portable state carries the writer's groups (foreach False, fused None for
    torch's per-tensor loop); loading it into this run's fused optimizer keeps fused."""
    from gentrain.strategies.portable import load_named_optimizer_state, named_optimizer_state

    module = torch.nn.Linear(4, 3)
    writer = make_optimizer(module.parameters(), OptimizerSection(implementation="for_loop"), "ddp")
    module(torch.randn(2, 4)).sum().backward()
    writer.step()
    saved = named_optimizer_state(writer, module)
    assert saved["param_groups"][0]["foreach"] is False
    reader = make_optimizer(module.parameters(), OptimizerSection(), "ddp")
    load_named_optimizer_state(reader, module, saved, "net")
    assert reader.param_groups[0]["fused"] is True and reader.param_groups[0]["foreach"] is None
    assert torch.equal(reader.state[module.weight]["exp_avg"], writer.state[module.weight]["exp_avg"])
