"""DeepSpeed strategy on a real gloo group of 2 CPU processes: ZeRO 0-3 against DDP.

    .venv/bin/python -m pytest -q tests/distributed/test_deepspeed.py

Spawning a world costs seconds, so each world runs many cases and several tests read its
results: the `equivalence` fixture (fp32 losses and grad norms against DDP, shard sizes,
export), the resume test (save, fresh engines, load) and the `features` fixture (GAN pair,
bf16, raw config, offload, fp16). The config merge needs no world.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gentrain.optim import make_optimizer
from gentrain.schema import SpecError
from gentrain.spec import JobSpec
from gentrain.strategies import StepSettings, make_strategy
from gentrain.strategies.deepspeed import deepspeed_config
from gentrain.validation import from_dict
from harness import run_world

STEPS = 6
GLOBAL_BATCH = 8
WIDTH = 16
STAGES = (0, 1, 2, 3)
CASES = {  # train-section overrides: clipping that bites, and accumulation with SGD (no clip)
    "adamw-clip": {"grad_clip": 0.05, "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01}},
    "sgd-accum2": {"grad_accum": 2, "grad_clip": None,
                   "optimizer": {"name": "sgd", "lr": 5e-2, "momentum": 0.9}},
}
# bf16 losses against fp32 after STEPS AdamW steps (measured: ZeRO 1-3 3.8e-4; ZeRO 0 2.5e-2,
# where the gradients stay bf16 from backward through the all-reduce into Adam).
BF16_RTOL = {0: 5e-2, 1: 2e-3, 2: 2e-3, 3: 2e-3}


class TinyNet(nn.Module):
    """Two linear layers and a 1-element parameter (ZeRO-3 must partition odd shapes too:
    fewer elements than ranks)."""

    def __init__(self, width: int = WIDTH, out: int = WIDTH):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, out)
        self.log_scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x))) * self.log_scale.exp()


def make_spec(strategy: dict | None = None, **train) -> JobSpec:
    spec = from_dict({"job": {"type": "vae"}, "train": {"steps": 50, "batch_size": GLOBAL_BATCH // 2, "grad_clip": 1.0,
                                "schedule": {"name": "cosine", "warmup_steps": 2}, **train}})
    # The strategy is set after validation: the bundled job types may not list deepspeed in
    # `supports` yet, and fp16 on CPU (refused at validation) must also fail at start-up.
    return dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, **(strategy or {})))


def _config(spec: JobSpec, world_size: int) -> dict:
    return deepspeed_config(spec.strategy, StepSettings.from_train(spec.train), world_size)


def build(spec: JobSpec, extra_untrained: bool = False):
    torch.manual_seed(0)  # identical initial weights on every rank and in every run
    net = TinyNet()
    modules = {"net": net}
    if extra_untrained:
        modules["prior"] = nn.Linear(4, 4)
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
    strategy.setup(modules, {"net": make_optimizer(net.parameters(), spec.train.optimizer)})
    return strategy


def micro_batch(step: int, micro: int, rank: int, world: int):
    """Slice `rank` of the global batch of (step, micro): any world size sees the same data."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_BATCH, WIDTH, generator=generator)
    target = torch.flip(x, dims=[1]).tanh()
    share = GLOBAL_BATCH // world
    return x[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share]


def train(strategy, spec: JobSpec, rank: int, world: int, first: int, last: int, ema: bool = False):
    """Optimizer steps first..last-1; the global mean loss and grad norm of each step."""
    accum = spec.train.grad_accum
    losses, norms = [], []
    for step in range(first, last):
        step_loss = torch.zeros(())
        for micro in range(accum):
            x, target = micro_batch(step, micro, rank, world)
            with strategy.micro_step(is_last=micro == accum - 1):
                with strategy.autocast():
                    out = strategy.module("net")(x)
                loss = F.mse_loss(out.float(), target)
                strategy.backward(loss, "net")
                stepped = strategy.step("net")
                if ema and strategy.at_boundary:
                    strategy.ema.update("net", 0.8)
            step_loss += loss.detach().float() / accum
        losses.append(float(strategy.all_reduce(step_loss)))
        norms.append(stepped["grad_norm"])
    return losses, norms


def flat(state: dict) -> torch.Tensor:
    return torch.cat([value.flatten().float() for _, value in sorted(state.items())])


# -- world 1: equivalence, shards, export ---------------------------------------------------
def _equivalence(rank: int, world: int):
    results = {}
    for case, overrides in CASES.items():
        for stage in (None,) + STAGES:  # None: the DDP reference
            section = {"name": "ddp"} if stage is None else {"name": "deepspeed", "zero_stage": stage}
            if stage == 3:  # below this size ZeRO-3 keeps parameters gathered (default 1e5)
                section["deepspeed_config"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
            spec = make_spec(section, **overrides)
            strategy = build(spec)
            losses, norms = train(strategy, spec, rank, world, 0, STEPS)
            entry = {"losses": losses, "norms": norms, "lr": strategy.lr("net")}
            if stage is not None and case == "adamw-clip":
                entry.update(_shard_sizes(strategy))
                entry["export"] = {k: tuple(v.shape) for k, v in strategy.export_state_dicts()["net"].items()}
            entry["params"] = flat(strategy.export_state_dicts()["net"])
            results[(case, stage)] = entry
            del strategy
            gc.collect()
    return results


def _shard_sizes(strategy) -> dict:
    engine = strategy.module("net")
    params = list(engine.module.parameters())
    state = engine.basic_optimizer.state.values()
    return {
        "param_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "param_local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "param_resident": sum(p.data.numel() for p in params),  # outside a gather
        "optimizer_state": sum(t.numel() for s in state for k, t in s.items()
                               if torch.is_tensor(t) and k != "step"),
    }


@pytest.fixture(scope="module")
def equivalence():
    return run_world(_equivalence, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_losses_match_ddp_for_every_zero_stage(equivalence, case):
    for rank_results in equivalence:
        reference = rank_results[(case, None)]
        assert len(set(reference["losses"])) == STEPS  # the weights move
        for stage in STAGES:
            got = rank_results[(case, stage)]
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]),
                                       rtol=1e-5, atol=0, msg=f"{case}, ZeRO {stage}: losses")
            torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(reference["norms"]),
                                       rtol=1e-5, atol=0, msg=f"{case}, ZeRO {stage}: grad norms")
            torch.testing.assert_close(got["params"], reference["params"], rtol=1e-5, atol=1e-6)
            assert got["lr"] == pytest.approx(reference["lr"], rel=1e-12)


def test_clipping_really_clips(equivalence):
    norms = equivalence[0][("adamw-clip", None)]["norms"]
    assert max(norms) > CASES["adamw-clip"]["grad_clip"], norms


def test_zero3_shards_parameters_and_zero12_shard_optimizer_state(equivalence):
    for rank_results in equivalence:
        sizes = {stage: rank_results[("adamw-clip", stage)] for stage in STAGES}
        total = sizes[0]["param_total"]
        assert sizes[0]["param_local"] == total
        # Each rank holds about 1/world of the parameters (ZeRO pads partitions a little).
        assert total / 2 <= sizes[3]["param_local"] <= total / 2 + 8, sizes[3]
        assert sizes[3]["param_resident"] == 0, sizes[3]
        full_state = sizes[0]["optimizer_state"]
        assert full_state == 2 * total  # Adam's two moments per parameter
        for stage in (1, 2, 3):
            assert full_state / 2 <= sizes[stage]["optimizer_state"] <= full_state / 2 + 16, sizes[stage]


def test_zero3_export_is_full_size_and_equal_on_both_ranks(equivalence):
    full_shapes = {k: tuple(v.shape) for k, v in TinyNet().state_dict().items()}
    first, second = (rank_results[("adamw-clip", 3)] for rank_results in equivalence)
    assert first["export"] == full_shapes
    assert torch.equal(first["params"], second["params"])


# -- world 2: resume --------------------------------------------------------------------------
def _resume(rank: int, world: int, directory: str):
    results = {}
    for stage in STAGES:
        spec = make_spec({"name": "deepspeed", "zero_stage": stage}, grad_accum=2, grad_clip=0.05,
                         optimizer={"name": "adamw", "lr": 1e-2})
        half = STEPS // 2
        straight = build(spec, extra_untrained=True)
        train(straight, spec, rank, world, 0, STEPS, ema=True)
        expected = straight.export_state_dicts(), straight.ema.state_dict()["net"], straight.lr("net")
        del straight
        first = build(spec, extra_untrained=True)
        train(first, spec, rank, world, 0, half, ema=True)
        folder = os.path.join(directory, f"zero{stage}")
        first.save(os.path.join(folder, f"rank{rank}"), rank)  # as in Ray: a folder per rank
        first.barrier()
        del first  # the engines are gone; fresh ones read the checkpoint
        gc.collect()
        merged = os.path.join(folder, f"merged-for-rank{rank}")  # what Ray's checkpoint holds
        for writer in range(world):
            shutil.copytree(os.path.join(folder, f"rank{writer}"), merged, dirs_exist_ok=True)
        resumed = build(spec, extra_untrained=True)
        resumed.load(merged)
        train(resumed, spec, rank, world, half, STEPS, ema=True)
        got = resumed.export_state_dicts(), resumed.ema.state_dict()["net"], resumed.lr("net")
        results[stage] = {
            "params": float((flat(got[0]["net"]) - flat(expected[0]["net"])).abs().max()),
            "untrained": float((flat(got[0]["prior"]) - flat(expected[0]["prior"])).abs().max()),
            "ema": float((flat(got[1]) - flat(expected[1])).abs().max()),
            "lr": (got[2], expected[2]),
        }
        del resumed
        gc.collect()
    return results


def test_resume_is_exact_for_every_zero_stage(tmp_path):
    for rank_results in run_world(_resume, 2, args=(str(tmp_path),)):
        for stage, result in rank_results.items():
            assert result["params"] <= 1e-6, (stage, result)
            assert result["ema"] <= 1e-6, (stage, result)
            assert result["untrained"] == 0.0, (stage, result)
            assert result["lr"][0] == pytest.approx(result["lr"][1], rel=1e-12), (stage, result)


# -- world 3: a GAN pair, bf16, raw config, offload, fp16 -------------------------------------
def _gan(rank: int, world: int, section: dict) -> list[tuple[float, float]]:
    """Alternating discriminator and generator steps; the global (d_loss, g_loss) per step."""
    spec = make_spec(section, grad_clip=1.0, optimizer={"name": "adam", "lr": 2e-3, "betas": [0.5, 0.999]})
    torch.manual_seed(0)
    generator, discriminator = TinyNet(4, WIDTH), TinyNet(WIDTH, 1)
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
    strategy.setup({"generator": generator, "discriminator": discriminator},
                   {name: make_optimizer(m.parameters(), spec.train.optimizer)
                    for name, m in (("generator", generator), ("discriminator", discriminator))})
    G, D = strategy.module("generator"), strategy.module("discriminator")
    losses = []
    for step in range(STEPS):
        real = micro_batch(step, 0, rank, world)[0].tanh()
        z = torch.randn(GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(500 + step))
        z = z[rank * len(real):(rank + 1) * len(real)]
        with strategy.micro_step(is_last=True):
            with strategy.autocast():
                fake = G(z)
                d_loss = (F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()).float()
            strategy.backward(d_loss, "discriminator")
            strategy.step("discriminator")
            # The generator's loss must not leave gradients on the discriminator.
            strategy.unwrap("discriminator").requires_grad_(False)
            with strategy.autocast():
                g_loss = F.softplus(-D(G(z))).mean().float()
            strategy.backward(g_loss, "generator")
            strategy.step("generator")
            strategy.unwrap("discriminator").requires_grad_(True)
        pair = strategy.all_reduce(torch.stack([d_loss.detach(), g_loss.detach()]))
        losses.append((float(pair[0]), float(pair[1])))
    return losses


def _run(rank: int, world: int, section: dict, **train_overrides) -> dict:
    spec = make_spec(section, **{"grad_clip": 0.05, "optimizer": {"name": "adamw", "lr": 1e-2}, **train_overrides})
    strategy = build(spec)
    losses, _ = train(strategy, spec, rank, world, 0, STEPS)
    engine = strategy.module("net")
    x = micro_batch(0, 0, rank, world)[0]
    with strategy.evaluation() as modules:  # fp32 data into the plain (maybe bf16) network
        evaluated = float(modules["net"](x).float().mean())
    return {"losses": losses, "evaluated": evaluated,
            "param_dtype": str(next(engine.module.parameters()).dtype) if hasattr(engine, "module") else None,
            "export": strategy.export_state_dicts()["net"],
            "config": getattr(engine, "config", None)}


def _rank0_evaluation(rank: int, world: int) -> dict:
    """ZeRO-3 with every weight partitioned: rank 0 alone runs forwards in evaluation (as
    sample grids and visuals do), then training goes on. Each forward of a ZeRO-3 network is
    a collective, so without hook-free evaluation modules the ranks' collectives mismatch."""
    zero3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    spec = make_spec(_section(3, deepspeed_config=zero3), grad_clip=0.05, optimizer={"name": "adamw", "lr": 1e-2})
    strategy = build(spec)
    half = STEPS // 2
    losses, _ = train(strategy, spec, rank, world, 0, half)
    plain = TinyNet()
    plain.load_state_dict(strategy.export_state_dicts()["net"])
    x = micro_batch(0, 0, 0, 1)[0]
    with torch.no_grad(), strategy.evaluation() as modules:
        net = modules["net"]  # a whole forward, and a submodule alone (as a VAE's decoder is)
        outputs = [(net(x), net.fc2(F.silu(net.fc1(x)))) for _ in range(3 if rank == 0 else 0)]
    later, _ = train(strategy, spec, rank, world, half, STEPS)
    return {"losses": losses + later, "outputs": outputs, "expected": plain(x).detach(),
            "expected_parts": plain.fc2(F.silu(plain.fc1(x))).detach()}


def _features(rank: int, world: int):
    results = {"gan": {str(stage): _gan(rank, world, _section(stage)) for stage in (None,) + STAGES}}
    results["fp32"] = _run(rank, world, {"name": "ddp"})
    results["zero3-rank0-eval"] = _rank0_evaluation(rank, world)
    for stage in STAGES:
        results[f"bf16-{stage}"] = _run(rank, world, _section(stage, precision="bf16"))
    raw = {"zero_optimization": {"reduce_bucket_size": 123456}, "wall_clock_breakdown": False,
           "gradient_clipping": 0.05}  # the same value as train.grad_clip: no conflict
    results["raw"] = _run(rank, world, _section(2, deepspeed_config=raw))
    results["offload-2"] = _run(rank, world, _section(2, offload_optimizer=True))
    results["offload-3"] = _run(rank, world, _section(3, offload_optimizer=True, offload_param=True))
    try:
        _run(rank, world, _section(0, precision="fp16"))
        results["fp16"] = "no error"
    except ValueError as exc:
        results["fp16"] = str(exc)
    return results


def _section(stage: int | None, **fields) -> dict:
    return {"name": "ddp"} if stage is None else {"name": "deepspeed", "zero_stage": stage, **fields}


@pytest.fixture(scope="module")
def features():
    return run_world(_features, 2)


def test_gan_pair_trains_and_matches_ddp(features):
    for rank_results in features:
        reference = torch.tensor(rank_results["gan"]["None"])
        assert torch.isfinite(reference).all()
        assert len(set(reference[:, 0].tolist())) == STEPS and len(set(reference[:, 1].tolist())) == STEPS
        for stage in STAGES:
            torch.testing.assert_close(torch.tensor(rank_results["gan"][str(stage)]), reference,
                                       rtol=1e-5, atol=0, msg=f"GAN under ZeRO {stage}")


def test_bf16_stays_close_to_fp32(features):
    fp32 = torch.tensor(features[0]["fp32"]["losses"])
    for stage in STAGES:
        result = features[0][f"bf16-{stage}"]
        assert result["param_dtype"] == "torch.bfloat16"
        exported, reference = flat(result["export"]), flat(features[0]["fp32"]["export"])
        assert exported.dtype == torch.float32
        assert (exported - reference).abs().max() <= 2e-2  # measured 9.6e-3 after STEPS steps
        if stage > 0:  # ZeRO keeps fp32 master weights, and the export gives them (not bf16 copies)
            assert (exported.bfloat16().float() != exported).any()
        relative = ((torch.tensor(result["losses"]) - fp32).abs() / fp32.abs()).max()
        assert relative <= BF16_RTOL[stage], (stage, result["losses"], fp32)
        assert result["evaluated"] == pytest.approx(features[0]["fp32"]["evaluated"], rel=5e-2, abs=1e-2)


def test_zero3_evaluation_on_rank0_alone_is_exact_and_training_goes_on(features):
    first, second = (rank_results["zero3-rank0-eval"] for rank_results in features)
    assert len(first["outputs"]) == 3 and not second["outputs"]
    for whole, parts in first["outputs"]:
        torch.testing.assert_close(whole, first["expected"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(parts, first["expected_parts"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(features[0]["fp32"]["losses"]),
                               rtol=1e-5, atol=0)


def test_raw_deepspeed_config_passes_through(features):
    config = features[0]["raw"]["config"]
    assert config["zero_optimization"]["reduce_bucket_size"] == 123456
    assert config["zero_optimization"]["stage"] == 2
    assert config["wall_clock_breakdown"] is False
    torch.testing.assert_close(torch.tensor(features[0]["raw"]["losses"]),
                               torch.tensor(features[0]["fp32"]["losses"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["offload-2", "offload-3"])
def test_cpu_offload_gives_the_same_losses(features, case):
    torch.testing.assert_close(torch.tensor(features[0][case]["losses"]),
                               torch.tensor(features[0]["fp32"]["losses"]), rtol=1e-5, atol=0)


def test_fp16_on_cpu_is_an_error_naming_bf16_unless_the_cpu_has_fp16_units(features):
    # DeepSpeed asks oneDNN: CPUs with AVX512-FP16 (recent Xeons) do run fp16 engines.
    cpu_fp16 = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    for rank_results in features:
        if cpu_fp16:
            assert rank_results["fp16"] == "no error"
        else:
            assert "strategy.precision" in rank_results["fp16"] and "bf16" in rank_results["fp16"]


# -- the config merge (no world needed) --------------------------------------------------------
def test_conflicting_raw_key_names_both_values_and_the_spec_field():
    spec = make_spec(_section(2, deepspeed_config={"gradient_clipping": 0.5, "steps_per_print": 7}))
    with pytest.raises(SpecError) as caught:
        _config(spec, world_size=2)
    assert ("strategy.deepspeed_config.gradient_clipping: 0.5 conflicts with train.grad_clip: 1.0; "
            "set train.grad_clip instead") in str(caught.value)


def test_nested_conflicts_and_owned_keys_are_reported_together():
    raw = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
           "optimizer": {"type": "AdamW"}, "bf16": {"enabled": True}}
    with pytest.raises(SpecError) as caught:
        _config(make_spec(_section(1, deepspeed_config=raw)), world_size=2)
    problems = "\n".join(caught.value.problems)
    assert "zero_optimization.stage: 3 conflicts with strategy.zero_stage: 1" in problems
    assert "offload_optimizer.device: \"cpu\" conflicts with strategy.offload_optimizer: false" in problems
    assert "bf16.enabled: true conflicts with strategy.precision: \"fp32\"" in problems
    assert "strategy.deepspeed_config.optimizer: gentrain passes its own optimizer" in problems
    assert len(caught.value.problems) == 4


def test_keys_gentrain_does_not_set_pass_through():
    raw = {"steps_per_print": 7, "zero_optimization": {"reduce_bucket_size": 1000,
                                                       "offload_optimizer": {"pin_memory": True}}}
    config = _config(make_spec(_section(2, offload_optimizer=True, deepspeed_config=raw)), 2)
    assert config["steps_per_print"] == 7
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000,
                                           "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                           "offload_param": {"device": "none"}}
    assert config["train_batch_size"] == GLOBAL_BATCH and config["gradient_accumulation_steps"] == 1


def test_a_section_given_as_a_scalar_is_an_error():
    spec = make_spec(_section(2, deepspeed_config={"zero_optimization": 2}))
    with pytest.raises(SpecError, match="zero_optimization: 2 must be a mapping"):
        _config(spec, world_size=2)
