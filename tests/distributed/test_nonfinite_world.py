"""Non-finite losses and gradients on real process groups: found before the update, alike on
every rank (gentrain.nonfinite), under DDP (worlds 1 and 2), Accelerate and DeepSpeed ZeRO 0-3
(world 2).

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest -q tests/distributed/test_nonfinite_world.py

A NaN is injected at step POISON on the last rank only, into one parameter's gradient (a
tensor hook, before DDP's and ZeRO's reductions) or into the loss: the other ranks must
take the same branch (a rank-local decision would leave them waiting in a collective).
Each world runs all its cases (spawning one costs seconds).
"""

from __future__ import annotations

import gc

import pytest
import torch

from common import GLOBAL_BATCH, LATENT, SHAPE, build_strategy, flat_params, global_batches, make_spec
from gentrain.context import StepContext
from gentrain.nonfinite import NonFiniteError
from gentrain_jobs.vae.objective import elbo_terms
from harness import run_world

STEPS = 5
POISON = 2  # the step whose gradient (or loss) is NaN on the last rank
PARAMETER = "decoder.blocks.1.1.weight"
ZERO2 = {"name": "deepspeed", "zero_stage": 2}
# ZeRO-3 keeps parameters below this size gathered (default 1e5): 0 really partitions them.
ZERO3 = {"name": "deepspeed", "zero_stage": 3,
         "deepspeed_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
DDP = {"name": "ddp"}


def _train(rank: int, world: int, section: dict, policy: str, poison: str) -> dict:
    spec = make_spec(section, nonfinite=policy, nonfinite_max_skips=1)
    strategy = build_strategy(spec)
    ctx = StepContext(strategy, None, STEPS)
    batches = global_batches(STEPS, 1)
    share = GLOBAL_BATCH // world
    before = None
    for step in range(STEPS):
        ctx.global_step = step
        poisoned = step == POISON and rank == world - 1
        if step == POISON:
            before = flat_params(strategy)
        hook = None
        if poisoned and poison == "gradient":
            parameter = strategy.unwrap("vae").get_parameter(PARAMETER)
            hook = parameter.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        x = batches[step][rank * share:(rank + 1) * share].to(strategy.input_dtype)
        noise = torch.randn(GLOBAL_BATCH, LATENT, generator=torch.Generator().manual_seed(step))
        try:
            with strategy.micro_step(is_last=True):
                with strategy.autocast():
                    loss = elbo_terms(strategy.module("vae"), x, "bernoulli",
                                      noise=noise[rank * share:(rank + 1) * share].to(strategy.input_dtype))
                    loss = loss["loss"].float().mean()
                if poisoned and poison == "loss":
                    loss = loss * float("nan")
                ctx.backward(loss, "vae")
                ctx.step("vae")
        except NonFiniteError as error:
            return {"error": str(error), "step": step, "unchanged": torch.equal(before, flat_params(strategy))}
        finally:
            if hook is not None:
                hook.remove()
    params = flat_params(strategy)
    return {"error": None, "skipped": strategy.nonfinite.skipped, "finite": bool(torch.isfinite(params).all()),
            "moved_after": not torch.equal(before, params)}


CASES = {  # (strategy section, policy, what is poisoned)
    "ddp-stop-gradient": (DDP, "stop", "gradient"),
    "ddp-stop-loss": (DDP, "stop", "loss"),
    "ddp-skip-gradient": (DDP, "skip", "gradient"),
}
WORLD2_CASES = {
    **CASES,
    "zero2-stop-gradient": (ZERO2, "stop", "gradient"),
    "zero2-stop-loss": (ZERO2, "stop", "loss"),
    "zero0-stop-gradient": ({"name": "deepspeed", "zero_stage": 0}, "stop", "gradient"),
    "zero1-stop-gradient": ({"name": "deepspeed", "zero_stage": 1}, "stop", "gradient"),
    "zero3-stop-gradient": (ZERO3, "stop", "gradient"),
    "accelerate-stop-gradient": ({"name": "accelerate"}, "stop", "gradient"),
    "accelerate-skip-gradient": ({"name": "accelerate"}, "skip", "gradient"),
}


def _cases(rank: int, world: int, names: list[str]) -> dict:
    results = {}
    for name in names:
        results[name] = _train(rank, world, *WORLD2_CASES[name])
        gc.collect()
    return results


@pytest.fixture(scope="module")
def world1():
    return run_world(_cases, world_size=1, args=(list(CASES),))


@pytest.fixture(scope="module")
def world2():
    return run_world(_cases, world_size=2, args=(list(WORLD2_CASES),))


def _stopped(result: dict, source: str) -> None:
    assert result["error"] is not None, result
    assert result["step"] == POISON
    assert result["unchanged"], "an update happened at the non-finite step"
    message = result["error"]
    assert f"at step {POISON + 1} in network 'vae'" in message
    assert PARAMETER in message if source == "gradient" else "its loss is not finite" in message
    # Advice that fits the spec: grad_clip is set (1.0) and precision is fp32, so neither is suggested.
    assert "train.optimizer.lr (now" in message and "train.nonfinite=skip" in message
    assert "grad_clip" not in message and "precision" not in message


@pytest.mark.parametrize("case", ["ddp-stop-gradient", "ddp-stop-loss"])
def test_stop_world1(world1, case):
    _stopped(world1[0][case], case.rsplit("-", 1)[1])


@pytest.mark.parametrize("case", ["ddp-stop-gradient", "ddp-stop-loss", "zero2-stop-gradient", "zero2-stop-loss",
                                  "zero0-stop-gradient", "zero1-stop-gradient", "zero3-stop-gradient",
                                  "accelerate-stop-gradient"])
def test_stop_world2_every_rank_alike(world2, case):
    for rank_result in world2:  # poisoned on rank 1 only: rank 0 stops at the same step, same words
        _stopped(rank_result[case], case.rsplit("-", 1)[1])
    assert world2[0][case]["error"] == world2[1][case]["error"]


@pytest.mark.parametrize("world, case", [("world1", "ddp-skip-gradient"), ("world2", "ddp-skip-gradient"),
                                         ("world2", "accelerate-skip-gradient")])
def test_skip_drops_one_update_and_goes_on(world, case, request):
    for rank_result in request.getfixturevalue(world):
        result = rank_result[case]
        assert result["error"] is None
        assert result["skipped"] == 1
        assert result["finite"] and result["moved_after"]
