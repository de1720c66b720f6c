"""AccelerateStrategy on real gloo process groups of CPU processes (see harness.py).

    .venv/bin/python -m pytest -q tests/distributed/test_accelerate.py

Spawning a world is the slow part, so three worlds carry every case: the main world
of 2 runs DDPStrategy and AccelerateStrategy side by side, bf16, a GAN-shaped pair and
the first half of a resume; a second world of 2 (new processes, new process group)
finishes the resume; a world of 1 with the whole batch is the batch-2B reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import FullyShardedDataParallelPlugin

from gentrain.optim import make_optimizer
from gentrain.strategies import StepSettings, make_strategy
from gentrain.strategies.accelerate import AccelerateStrategy
from gentrain.validation import from_dict
from gentrain_jobs.vae.model import ConvVAE
from gentrain_jobs.vae.objective import elbo_terms
from common import close
from harness import run_world

SHAPE = (1, 8, 8)
LATENT = 4
GLOBAL_BATCH = 8  # each of 2 workers sees 4, a single worker all 8
STEPS = 6
RESUME_AT = 3
GAN_STEPS = 25
CASES = {"plain": {"grad_accum": 1, "grad_clip": None},
         "accum2_clip": {"grad_accum": 2, "grad_clip": 0.5}}
# bf16 vs fp32 over STEPS steps (measured: losses 7e-6, grad norms 4e-3, weights 2e-3).
# Losses barely move: near-zero logits make the Bernoulli loss insensitive at this stage.
BF16_LOSS_RTOL, BF16_NORM_RTOL, BF16_WEIGHTS_RTOL = 1e-3, 2e-2, 1e-2


def make_spec(strategy: str, precision: str = "fp32", mode: str = "ddp", **train):
    """A validated VAE spec; the strategy section is swapped in after validation because
    the VAE may not list every strategy (or fp16 without GPUs) in its `supports`."""
    spec = from_dict({"job": {"type": "vae"},
                      "train": {"steps": STEPS, **train,
                                "optimizer": {"name": "adamw", "lr": 1e-2},
                                "schedule": {"name": "cosine", "warmup_steps": 2}}})
    section = dataclasses.replace(spec.strategy, name=strategy, precision=precision,
                                  accelerate_mode=mode)
    return dataclasses.replace(spec, strategy=section)


def new_strategy(spec, modules: dict):
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
    strategy.setup(modules, {name: make_optimizer(m.parameters(), spec.train.optimizer)
                             for name, m in modules.items()})
    return strategy


def vae_strategy(spec, init_seed: int = 0):
    torch.manual_seed(init_seed)  # identical initial weights on every rank and run
    model = ConvVAE(SHAPE, LATENT, [4, 8], "bernoulli")
    model.enable_grad_checkpointing(spec.strategy.grad_checkpointing)  # as the loop does
    return new_strategy(spec, {"vae": model})


def shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    share = len(tensor) // world
    return tensor[rank * share:(rank + 1) * share]


def train_vae(strategy, spec, rank: int, world: int, first: int, last: int) -> dict:
    """Steps first..last-1 on fixed data; global mean losses and grad norms per step."""
    accum = spec.train.grad_accum
    losses, norms = [], []
    for step in range(first, last):
        step_loss = torch.zeros(())
        for micro in range(accum):
            # The global batch and its noise, sliced per rank: any world size compares.
            generator = torch.Generator().manual_seed(1000 * step + micro)
            x = shard(torch.rand(GLOBAL_BATCH, *SHAPE, generator=generator), rank, world)
            noise = shard(torch.randn(GLOBAL_BATCH, LATENT, generator=generator), rank, world)
            with strategy.micro_step(is_last=micro == accum - 1):
                with strategy.autocast():
                    loss = elbo_terms(strategy.module("vae"), x, "bernoulli", noise=noise)["loss"].mean()
                strategy.backward(loss, "vae")
                stepped = strategy.step("vae")
            step_loss += loss.detach().float() / accum
        strategy.ema.update("vae", 0.9)
        losses.append(float(strategy.all_reduce(step_loss)))
        norms.append(stepped["grad_norm"])
    return {"losses": losses, "norms": norms, "params": flat(strategy, "vae"),
            "ema": flat_module(strategy.ema.get("vae"))}


def flat_module(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


def flat(strategy, name: str) -> torch.Tensor:
    state = strategy.export_state_dicts()[name]
    if any(v.dtype != torch.float32 for v in state.values()):
        raise TypeError("export_state_dicts must give plain fp32 tensors")
    return torch.cat([state[k].flatten() for k in sorted(state)])


def ema_uses_its_own_weights(strategy) -> bool:
    """The EMA copy computes with the EMA weights, in fp32, outside autocast."""
    x, noise = torch.rand(2, *SHAPE), torch.randn(2, LATENT)
    with strategy.evaluation() as modules, torch.no_grad():
        reference = ConvVAE(SHAPE, LATENT, [4, 8], "bernoulli")
        reference.load_state_dict(modules["vae"].state_dict())
        ema_out = modules["vae"](x, noise=noise).decoded
        live_out = strategy.unwrap("vae")(x, noise=noise).decoded
    return (ema_out.dtype == torch.float32 and torch.equal(ema_out, reference(x, noise=noise).decoded)
            and not torch.equal(ema_out, live_out))


# -- a GAN-shaped pair: two networks, two optimizers, alternating steps -------------------

def gan_strategy(spec):
    torch.manual_seed(0)
    generator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    discriminator = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    return new_strategy(spec, {"generator": generator, "discriminator": discriminator})


def train_gan(strategy, rank: int, world: int, steps: int) -> dict:
    d_losses, g_losses, fake_means = [], [], []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        real = shard(torch.randn(GLOBAL_BATCH, 8, generator=generator) * 0.5 + 2.0, rank, world)
        z = shard(torch.randn(GLOBAL_BATCH, 4, generator=generator), rank, world)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        # The generator's step left gradients in the discriminator: drop them.
        strategy.unwrap("discriminator").zero_grad(set_to_none=True)
        with strategy.micro_step(is_last=True):
            with strategy.autocast():
                fake = strategy.module("generator")(z)
                # One discriminator call per backward (DDP marks each parameter once).
                logits = strategy.module("discriminator")(torch.cat([real, fake.detach()]))
                d_loss = F.binary_cross_entropy_with_logits(logits.float(), torch.cat([ones, zeros]))
            strategy.backward(d_loss, "discriminator")
            strategy.step("discriminator")
            with strategy.autocast():
                g_logits = strategy.module("discriminator")(fake)
                g_loss = F.binary_cross_entropy_with_logits(g_logits.float(), ones)
            strategy.backward(g_loss, "generator")
            strategy.step("generator")
        d_losses.append(float(strategy.all_reduce(d_loss.detach())))
        g_losses.append(float(strategy.all_reduce(g_loss.detach())))
        fake_means.append(float(strategy.all_reduce(fake.detach().mean())))
    return {"d": d_losses, "g": g_losses, "fake_mean": fake_means,
            "params": torch.cat([flat(strategy, "generator"), flat(strategy, "discriminator")])}


# -- what Accelerate itself does on a CPU (why the strategy refuses fp16 and FSDP) ---------

def accelerate_on_cpu() -> dict:
    found = {}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    found["fsdp"] = (str(accelerator.distributed_type), type(model).__name__)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    with accelerator.autocast():
        found["fp16_dtype"] = str(torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype)
    return found


# -- the worlds ------------------------------------------------------------------------

def _main_world(rank: int, world: int, directory: str) -> dict:
    out = {}
    for label, train in CASES.items():
        for name in ("ddp", "accelerate"):
            spec = make_spec(name, **train)
            out[name, label] = train_vae(vae_strategy(spec), spec, rank, world, 0, STEPS)
    spec = make_spec("accelerate", **CASES["accum2_clip"])
    spec = dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, grad_checkpointing=True))
    out["checkpointed"] = train_vae(vae_strategy(spec), spec, rank, world, 0, STEPS)
    spec = make_spec("accelerate", "bf16", **CASES["accum2_clip"])
    strategy = vae_strategy(spec)
    with strategy.autocast():
        decoded = strategy.module("vae")(torch.rand(2, *SHAPE), noise=torch.zeros(2, LATENT)).decoded
    out["bf16_dtype"] = str(decoded.dtype)
    out["bf16"] = train_vae(strategy, spec, rank, world, 0, STEPS)
    out["ema_own_weights"] = ema_uses_its_own_weights(strategy)
    for name in ("ddp", "accelerate"):
        out["gan", name] = train_gan(gan_strategy(make_spec(name, steps=GAN_STEPS)), rank, world,
                                     GAN_STEPS)
    # Resume, first half: the straight run, then RESUME_AT steps and a checkpoint.
    spec = make_spec("accelerate", **CASES["accum2_clip"])
    out["straight"] = train_vae(vae_strategy(spec), spec, rank, world, 0, STEPS)
    first_half = vae_strategy(spec)
    train_vae(first_half, spec, rank, world, 0, RESUME_AT)
    first_half.write_checkpoint(directory, rank)
    first_half.barrier()
    out["cpu"] = accelerate_on_cpu()
    return out


def _resume_world(rank: int, world: int, directory: str) -> dict:
    spec = make_spec("accelerate", **CASES["accum2_clip"])
    strategy = vae_strategy(spec, init_seed=99)  # other weights: only the checkpoint can match
    strategy.load(directory)
    return train_vae(strategy, spec, rank, world, RESUME_AT, STEPS)


def _single_world(rank: int, world: int) -> dict:
    specs = {label: make_spec("accelerate", **train) for label, train in CASES.items()}
    return {label: train_vae(vae_strategy(spec), spec, rank, world, 0, STEPS)
            for label, spec in specs.items()}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("accelerate-checkpoint"))


@pytest.fixture(scope="module")
def main_world(checkpoint_dir):
    return run_world(_main_world, 2, args=(checkpoint_dir,))


# -- the tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("label", sorted(CASES))
def test_fp32_matches_ddp(main_world, label):
    for rank_result in main_world:
        ddp, accelerate = rank_result["ddp", label], rank_result["accelerate", label]
        close(accelerate["losses"], ddp["losses"], rtol=1e-5)
        close(accelerate["norms"], ddp["norms"], rtol=1e-5)  # the true global norm, as DDP's
        close(accelerate["params"], ddp["params"], rtol=1e-5, atol=1e-6)
        assert len(set(ddp["losses"])) == STEPS  # the weights move: each step sees a new loss
    if CASES[label]["grad_clip"] is not None:  # clipping really happened
        assert max(main_world[0]["ddp", label]["norms"]) > CASES[label]["grad_clip"]
    close(main_world[1]["accelerate", label]["params"], main_world[0]["accelerate", label]["params"],
          rtol=0, atol=0)  # replicas stay identical


def test_grad_checkpointing_changes_no_number(main_world):
    checkpointed, plain = main_world[0]["checkpointed"], main_world[0]["accelerate", "accum2_clip"]
    close(checkpointed["losses"], plain["losses"], rtol=1e-6)
    close(checkpointed["params"], plain["params"], rtol=1e-6, atol=1e-7)


def test_two_workers_batch_b_match_one_worker_batch_2b(main_world):
    single = run_world(_single_world, 1)[0]
    for label in CASES:
        two, one = main_world[0]["accelerate", label], single[label]
        close(two["losses"], one["losses"], rtol=1e-5)
        close(two["norms"], one["norms"], rtol=1e-5)
        close(two["params"], one["params"], rtol=1e-5, atol=1e-6)


def test_bf16_runs_autocast_and_stays_near_fp32(main_world):
    assert main_world[0]["bf16_dtype"] == "torch.bfloat16"  # not a silent fp32 run
    bf16, fp32 = main_world[0]["bf16"], main_world[0]["accelerate", "accum2_clip"]
    close(bf16["losses"], fp32["losses"], rtol=BF16_LOSS_RTOL)
    close(bf16["norms"], fp32["norms"], rtol=BF16_NORM_RTOL)
    weights_change = float((bf16["params"] - fp32["params"]).norm() / fp32["params"].norm())
    assert 0 < weights_change < BF16_WEIGHTS_RTOL
    assert bf16["params"].dtype == torch.float32  # export is fp32 whatever the precision
    assert main_world[0]["ema_own_weights"]


def test_resume_in_new_processes_is_exact(main_world, checkpoint_dir):
    resumed = run_world(_resume_world, 2, args=(checkpoint_dir,))
    for rank_result, straight in zip(resumed, (r["straight"] for r in main_world)):
        assert float((rank_result["params"] - straight["params"]).abs().max()) <= 1e-6
        assert float((rank_result["ema"] - straight["ema"]).abs().max()) <= 1e-6
        close(rank_result["losses"], straight["losses"][RESUME_AT:], rtol=1e-6)


def test_gan_pair_trains_and_matches_ddp(main_world):
    ddp, accelerate = main_world[0]["gan", "ddp"], main_world[0]["gan", "accelerate"]
    close(accelerate["d"], ddp["d"], rtol=1e-5)
    close(accelerate["g"], ddp["g"], rtol=1e-5)
    close(main_world[1]["gan", "accelerate"]["params"], accelerate["params"], rtol=0, atol=0)
    # The real data sit at 2.0: the generator's samples must have moved towards them.
    means = accelerate["fake_mean"]
    assert abs(means[-1] - 2.0) < 0.9 * abs(means[0] - 2.0), means


def test_accelerate_alone_would_downgrade_fsdp_and_fp16_on_cpu(main_world):
    # Canaries for the refusals below: if Accelerate changes, these say so.
    found = main_world[0]["cpu"]
    assert found["fsdp"] == ("DistributedType.MULTI_CPU", "DistributedDataParallel"), found
    assert found["fp16_dtype"] == "torch.float32", found


def test_fsdp_on_cpu_is_refused_with_the_field_named():
    spec = make_spec("accelerate", mode="fsdp")
    with pytest.raises(ValueError, match="strategy.accelerate_mode: 'fsdp'.*zero_stage=3"):
        AccelerateStrategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))


def test_fp16_on_cpu_is_an_error_naming_bf16():
    spec = make_spec("accelerate", "fp16")
    with pytest.raises(ValueError, match="strategy.precision: 'fp16'.*strategy.precision=bf16"):
        AccelerateStrategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
