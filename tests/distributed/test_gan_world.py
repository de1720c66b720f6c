"""The GAN job type's own train_step at world size 2 (gloo), stepped by the engine as a run
steps it (gentrain.engine.Engine.optimizer_step): the gradient penalty taken
through the plain critic and the frozen critic in the generator step still leave every
rank with the same weights, under DDP and Accelerate; under DeepSpeed ZeRO 0-3 the
hinge + spectral-norm DCGAN and ZeRO 0-2 the WGAN-GP follow DDP's losses and weights.
"""

import dataclasses

import pytest
import torch

from harness import run_world

WORLD = 2


def run_gan_job(rank: int, world: int, strategy_section: dict, steps: int, config_overrides: dict | None = None):
    """`steps` optimizer steps of the GAN job type through the engine, as a run takes them;
    each rank draws its own data. Both networks get AdamW at lr 3e-3."""
    from gentrain.engine import Engine
    from gentrain.registry import DataInfo
    from gentrain.validation import from_dict

    settings = {"arch": "mlp", "latent_dim": 4, "hidden": 16, "depth": 2, "loss": "wgan-gp", "d_norm": "none",
                "n_critic": 2, "ema_decay": 0.9, "g_lr": 3e-3, "d_lr": 3e-3, "betas": [0.9, 0.999],
                **(config_overrides or {})}
    spec = from_dict({"job": {"type": "gan", "config": settings},
                      "train": {"steps": 100, "batch_size": 8, "grad_clip": None,
                                "optimizer": {"name": "adamw", "lr": 3e-3},
                                "schedule": {"name": "cosine", "warmup_steps": 2}}})
    # The strategy is applied after validation, as in tests/distributed/common.make_spec.
    spec = dataclasses.replace(spec, strategy=dataclasses.replace(spec.strategy, **strategy_section))
    data_info = DataInfo((2,), kind="vector") if settings["arch"] == "mlp" else DataInfo((1, 8, 8))
    engine = Engine(spec, rank=rank, world_size=world, data_info=data_info, print_fn=None)
    data = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    batches = iter(lambda: {data_info.input_key: torch.rand(8, *data_info.shape, generator=data)}, None)
    penalties = []
    for _ in range(steps):
        metrics = engine.optimizer_step(batches)
        penalties.append(float(metrics["gradient_penalty"] if engine.config.loss == "wgan-gp" else metrics["d_loss"]))
    weights = {}
    for name, state in engine.strategy.export_state_dicts().items():
        buffers = {key for key, _ in engine.strategy.unwrap(name).named_buffers()}
        weights[name] = torch.cat([v.flatten() for key, v in state.items() if key not in buffers])
        weights[f"{name} buffers"] = torch.cat([torch.zeros(0)] + [v.flatten().float() for key, v in state.items()
                                                                   if key in buffers])
    return weights, penalties


REPLICA_SECTIONS = {"ddp": {"name": "ddp"}, "accelerate": {"name": "accelerate"}}
DCGAN = {"arch": "dcgan", "latent_dim": 8, "channels": [8, 16], "loss": "hinge", "d_norm": "spectral",
         "n_critic": 1}
ZERO_CASES = {"hinge-spectral-dcgan": (DCGAN, (0, 1, 2, 3)), "wgan-gp-mlp": ({}, (1, 2))}


def run_every_case(rank: int, world: int) -> dict:
    """One world for every case (spawning one is the slow part): the WGAN-GP step under
    DDP and Accelerate, then per ZERO_CASES entry DDP and DeepSpeed at each ZeRO stage on
    the same data, as (weights, per-step values)."""
    results = {("replicas", label): run_gan_job(rank, world, section, 4)
               for label, section in REPLICA_SECTIONS.items()}
    for case, (config_overrides, stages) in ZERO_CASES.items():
        results[case, "ddp"] = run_gan_job(rank, world, {"name": "ddp"}, 3, config_overrides)
        for stage in stages:
            results[case, stage] = run_gan_job(rank, world, {"name": "deepspeed", "zero_stage": stage}, 3,
                                               config_overrides)
    return results


@pytest.fixture(scope="module")
def every_case():  # [rank 0's results, rank 1's]
    return run_world(run_every_case, WORLD, timeout=600)


@pytest.mark.parametrize("label", sorted(REPLICA_SECTIONS))
def test_wgan_gp_step_keeps_replicas_identical(every_case, label):
    (first, penalties), (second, _) = (rank_results["replicas", label] for rank_results in every_case)
    assert all(p > 0 for p in penalties)
    for name in ("generator", "discriminator", "generator buffers", "discriminator buffers"):
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_deepspeed_zero_trains_the_gan_like_ddp(every_case, case):
    """The generator learns through the frozen critic's plain network (ctx.frozen), so no
    ZeRO gradient hook of the critic's engine runs inside the generator's backward."""
    _, stages = ZERO_CASES[case]
    for rank, results in enumerate(every_case):
        reference_weights, reference_values = results[case, "ddp"]
        for stage in stages:
            weights, values = results[case, stage]
            torch.testing.assert_close(torch.tensor(values), torch.tensor(reference_values), rtol=1e-5, atol=0,
                                       msg=f"ZeRO {stage}: per-step losses")
            # Buffers (the DCGAN generator's batch-norm statistics) on rank 0 only: DDP
            # broadcasts rank 0's at every forward, DeepSpeed keeps each rank's own (the
            # ranks draw different noise), and a checkpoint holds rank 0's under both.
            names = ["generator", "discriminator"] + (["generator buffers", "discriminator buffers"]
                                                      if rank == 0 else [])
            for name in names:
                torch.testing.assert_close(weights[name], reference_weights[name], rtol=1e-4, atol=1e-6,
                                           msg=f"ZeRO {stage}: {name}")
