"""Non-finite losses and gradients on real process groups: found before the update, alike on
every rank (gentrain.nonfinite), under DDP (worlds 1 and 2), Accelerate and DeepSpeed ZeRO 0-3
(world 2): stop, skip (DeepSpeed too: a skipped update leaves its weights and optimizer
state exactly as they were, and the run equals one that never saw that batch), and
rollback through the engine (DDP and ZeRO-2).

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest -q tests/distributed/test_nonfinite_world.py

A NaN is injected at step POISON on the last rank only, into one parameter's gradient (a
tensor hook, before DDP's and ZeRO's reductions) or into the loss: the other ranks must
take the same branch (a rank-local decision would leave them waiting in a collective).
Each world runs all its cases (spawning one costs seconds).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

import gentrain
from common import GLOBAL_BATCH, LATENT, SHAPE, build_strategy, flat_params, global_batches, make_spec
from gentrain.checkpoint import MODEL_FILE, step_dir_name
from gentrain.context import StepContext
from gentrain.engine import Engine
from gentrain.nonfinite import NonFiniteError, NonFiniteRollback
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
                if poisoned and poison == "loss-only":  # a term without gradients: they stay finite
                    loss = loss + torch.tensor(float("inf"))
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
    # DDP decides from the all-reduced gradient norm: the sentinel carries this rank's bad
    # loss to the other ranks although every gradient is finite (gentrain.nonfinite).
    "ddp-stop-loss-only": (DDP, "stop", "loss-only"),
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


def test_a_bad_loss_with_finite_gradients_stops_every_rank_under_ddp(world2):
    for rank_result in world2:
        _stopped(rank_result["ddp-stop-loss-only"], "loss")
        assert "its loss is not finite (its gradients are finite)" in rank_result["ddp-stop-loss-only"]["error"]
    assert world2[0]["ddp-stop-loss-only"]["error"] == world2[1]["ddp-stop-loss-only"]["error"]


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


# -- DeepSpeed skip: DeepSpeed's own overflow path, exactly -------------------------------------
def _step(strategy, ctx, rank: int, world: int, step: int, batch: torch.Tensor, poisoned: bool) -> None:
    share = GLOBAL_BATCH // world
    ctx.global_step = step
    hook = None
    if poisoned:
        hook = strategy.unwrap("vae").get_parameter(PARAMETER).register_hook(
            lambda grad: torch.full_like(grad, float("nan")))
    x = batch[rank * share:(rank + 1) * share].to(strategy.input_dtype)
    noise = torch.randn(GLOBAL_BATCH, LATENT, generator=torch.Generator().manual_seed(step))
    try:
        with strategy.micro_step(is_last=True):
            with strategy.autocast():
                loss = elbo_terms(strategy.module("vae"), x, "bernoulli",
                                  noise=noise[rank * share:(rank + 1) * share].to(strategy.input_dtype))
                loss = loss["loss"].float().mean()
            ctx.backward(loss, "vae")
            ctx.step("vae")
    finally:
        if hook is not None:
            hook.remove()


def _optimizer_state(strategy) -> torch.Tensor:
    """This rank's optimizer state (its partitions under ZeRO), every tensor, flattened."""
    optimizer = strategy._engines["vae"].basic_optimizer  # Adam's own, under every wrapper
    tensors = [value.detach().float().flatten().cpu() for entry in optimizer.state.values()
               for _, value in sorted(entry.items()) if torch.is_tensor(value)]
    assert tensors, "no optimizer state yet"
    return torch.cat(tensors)


def _skip_against_never_seen(rank: int, world: int, section: dict) -> dict:
    """Run A poisons step POISON on the last rank under skip; run B leaves that batch out."""
    spec = make_spec(section, nonfinite="skip", nonfinite_max_skips=1)
    batches = global_batches(STEPS, 1)
    skipping = build_strategy(spec)
    ctx = StepContext(skipping, None, STEPS)
    result = {}
    for step in range(STEPS):
        if step == POISON:
            weights, state = flat_params(skipping), _optimizer_state(skipping)
            lr, skipped_steps = skipping.lr("vae"), skipping._engines["vae"].skipped_steps
        _step(skipping, ctx, rank, world, step, batches[step], poisoned=step == POISON and rank == world - 1)
        if step == POISON:
            result.update(weights_kept=torch.equal(weights, flat_params(skipping)),
                          state_kept=torch.equal(state, _optimizer_state(skipping)),
                          lr_kept=skipping.lr("vae") == lr,
                          counted=skipping._engines["vae"].skipped_steps == skipped_steps + 1)
    never = build_strategy(spec)
    ctx = StepContext(never, None, STEPS)
    for step in range(STEPS):
        if step != POISON:
            _step(never, ctx, rank, world, step, batches[step], poisoned=False)
    final = flat_params(skipping)
    result.update(skipped=skipping.nonfinite.skipped, finite=bool(torch.isfinite(final).all()),
                  moved_after=not torch.equal(weights, final),
                  difference=float((final - flat_params(never)).abs().max()))
    return result


ZERO0 = {"name": "deepspeed", "zero_stage": 0}
ZERO1 = {"name": "deepspeed", "zero_stage": 1}
SKIP_CASES = {
    "zero0": ZERO0, "zero1": ZERO1, "zero2": ZERO2, "zero3": ZERO3,
    "zero0-bf16": {**ZERO0, "precision": "bf16"},  # FP16_UnfusedOptimizer: the fourth wrapper
    "zero2-bf16": {**ZERO2, "precision": "bf16"},
}


# ZeRO-1 in bf16 with fp32 gradient accumulation: DeepSpeed picks its BF16_Optimizer, whose
# overflow branch gentrain does not force: refused under skip, accepted under stop.
BF16_OPTIMIZER = {**ZERO1, "precision": "bf16", "deepspeed_config": {"data_types": {"grad_accum_dtype": "fp32"}}}


def _skip_cases(rank: int, world: int) -> dict:
    results = {}
    for name, section in SKIP_CASES.items():
        results[name] = _skip_against_never_seen(rank, world, section)
        gc.collect()
    for policy in ("skip", "stop"):
        try:
            strategy = build_strategy(make_spec(BF16_OPTIMIZER, nonfinite=policy))
            results[f"bf16-optimizer-{policy}"] = type(strategy._engines["vae"].optimizer).__name__
        except ValueError as error:
            results[f"bf16-optimizer-{policy}"] = str(error)
    return results


@pytest.fixture(scope="module")
def deepspeed_skips():
    return run_world(_skip_cases, world_size=2)


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_deepspeed_skip_keeps_weights_and_optimizer_state_and_equals_a_run_without_that_batch(
        deepspeed_skips, case):
    for rank_result in deepspeed_skips:  # poisoned on rank 1 only
        result = rank_result[case]
        assert result["weights_kept"] and result["state_kept"], result
        assert result["lr_kept"] and result["counted"], result  # the schedule waited; DeepSpeed counted a skip
        assert result["skipped"] == 1 and result["finite"] and result["moved_after"], result
        assert result["difference"] == 0.0, result


def test_deepspeed_skip_refuses_an_optimizer_wrapper_it_cannot_drop_through(deepspeed_skips):
    assert deepspeed_skips[0]["bf16-optimizer-skip"].startswith(
        "train.nonfinite: 'skip' drops non-finite updates through the overflow branch")
    assert "DeepSpeed chose BF16_Optimizer" in deepspeed_skips[0]["bf16-optimizer-skip"]
    assert deepspeed_skips[0]["bf16-optimizer-stop"] == "BF16_Optimizer"  # stop needs no drop


# -- rollback through the engine, two ranks ----------------------------------------------------
ROLLBACK_CASES = {"ddp": DDP, "zero2": ZERO2}


def _rollback(rank: int, world: int, section: dict, storage: str) -> dict:
    spec = gentrain.load("vae/debug", ["train.steps=8", "train.schedule.warmup_steps=2", "train.batch_size=4",
                                       "eval.num_samples=4", "eval.max_batches=1", f"storage_path={storage}",
                                       "tracking.enabled=false", "train.nonfinite=rollback"])
    spec.strategy = type(spec.strategy)(**{**vars(spec.strategy), **section})
    engine = Engine(spec, rank=rank, world_size=world, print_fn=None)
    poisoned = {"left": rank == world - 1}

    def hook(grad):  # the last rank only, once, at step 4
        if engine.step == 3 and poisoned["left"]:
            poisoned["left"] = False
            return torch.full_like(grad, float("nan"))
        return grad

    engine.strategy.unwrap("vae").get_parameter(PARAMETER).register_hook(hook)
    batches = engine.train_batches()
    for _ in range(2):
        engine.optimizer_step(batches)
    folder = os.path.join(spec.run_dir, step_dir_name(2))
    engine.save(folder)
    engine.optimizer_step(batches)
    base = engine.strategy.base_lr("vae")
    try:
        engine.optimizer_step(batches)
        return {"error": "no rollback"}
    except NonFiniteRollback as error:
        restored = engine.roll_back(error)
    saved = torch.load(os.path.join(folder, MODEL_FILE), weights_only=True)["networks"]["vae"]
    exported = engine.strategy.export_state_dicts()["vae"]
    result = {"error": None, "restored": restored == folder, "step": engine.step,
              "equal_to_checkpoint": all(torch.equal(exported[key], saved[key]) for key in saved),
              "lr_halved": engine.strategy.base_lr("vae") == base / 2, "rollbacks": engine.rollbacks}
    batches = engine.train_batches()
    for _ in range(3):
        engine.optimizer_step(batches)
    final = torch.cat([v.flatten() for _, v in sorted(engine.strategy.export_state_dicts()["vae"].items())])
    result.update(finite=bool(torch.isfinite(final).all()), final=final, lr=engine.strategy.lr("vae"))
    return result


def _rollback_cases(rank: int, world: int, storage: str) -> dict:
    results = {}
    for name, section in ROLLBACK_CASES.items():
        results[name] = _rollback(rank, world, section, os.path.join(storage, name))
        gc.collect()
    return results


@pytest.fixture(scope="module")
def rollbacks(tmp_path_factory):
    return run_world(_rollback_cases, world_size=2, args=(str(tmp_path_factory.mktemp("rollback")),))


@pytest.mark.parametrize("case", list(ROLLBACK_CASES))
def test_rollback_every_rank_restores_the_checkpoint_and_lowers_the_lr(rollbacks, case):
    for rank_result in rollbacks:  # poisoned on rank 1 only: rank 0 rolls back alike
        result = rank_result[case]
        assert result["error"] is None and result["restored"] and result["step"] == 2, result
        assert result["equal_to_checkpoint"] and result["lr_halved"] and result["rollbacks"] == 1, result
        assert result["finite"], result
    assert torch.equal(rollbacks[0][case]["final"], rollbacks[1][case]["final"])
    assert rollbacks[0][case]["lr"] == rollbacks[1][case]["lr"]
