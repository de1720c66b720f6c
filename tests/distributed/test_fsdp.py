"""FSDP2 (`fully_shard`) on a real gloo group of 2 CPU processes: the same losses as DDP,
sharded parameters, whole hook-free copies for evaluation that rank 0 alone may run, and an
exact resume through the engine's checkpoint (the strategy-neutral files are fsdp's own).

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/distributed/test_fsdp.py -q
"""

from __future__ import annotations

import pytest
import torch

from common import build_strategy, flat_params, make_spec, train
from harness import run_world

STEPS = 4


def fsdp_against_ddp(rank, world, directory):
    out = {}
    for label in ("ddp", "fsdp"):
        spec = make_spec({"name": label}, grad_accum=2)
        strategy = build_strategy(spec)
        out[label] = {"losses": train(strategy, spec, rank, world, 0, STEPS), "params": flat_params(strategy)}
    from torch.distributed.tensor import DTensor

    local = [p.to_local().numel() for p in strategy.unwrap("vae").parameters() if isinstance(p, DTensor)]
    full = sum(p.numel() for p in strategy.unwrap("vae").parameters())
    out["local_share"] = sum(local) / full
    with strategy.evaluation() as modules:  # one collective to build the copies, then rank 0 alone
        if rank == 0:
            x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            for _ in range(3):
                modules["vae"](x)
        out["hook_free"] = not any(isinstance(p, DTensor) for p in modules["vae"].parameters())
    strategy.barrier()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(fsdp_against_ddp, 2, args=(str(tmp_path_factory.mktemp("fsdp")),), timeout=600)


def test_fsdp_trains_as_ddp_does(results):
    for rank_results in results:
        torch.testing.assert_close(torch.tensor(rank_results["fsdp"]["losses"]),
                                   torch.tensor(rank_results["ddp"]["losses"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(rank_results["fsdp"]["params"], rank_results["ddp"]["params"],
                                   rtol=1e-5, atol=1e-6)


def test_each_rank_holds_half_the_parameters_and_evaluates_on_whole_copies(results):
    for rank_results in results:
        assert rank_results["local_share"] <= 0.55
        assert rank_results["hook_free"]


def tied_transformer_copy(rank, world):
    """The whole copy fsdp evaluates with keeps the transformer's tied embedding and head."""
    from gentrain.optim import make_optimizer
    from gentrain.strategies import StepSettings, make_strategy
    from gentrain_jobs.transformer.model import DecoderLM

    spec = make_spec({"name": "fsdp"})
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=64, context=8, layers=1, d_model=16, heads=2)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
    strategy = make_strategy(spec.strategy, StepSettings.from_train(spec.train), torch.device("cpu"))
    strategy.setup({"lm": model}, {"lm": make_optimizer(model.parameters(), spec.train.optimizer)})
    with strategy.evaluation() as modules, torch.no_grad():
        copy = modules["lm"]
        return {"tied": copy.head.weight is copy.embed.weight,
                "max_difference": float((copy(tokens) - expected).abs().max())}


def test_a_tied_network_is_evaluated_with_its_tied_weights():
    for result in run_world(tied_transformer_copy, 2, timeout=300):
        assert result["tied"]
        assert result["max_difference"] == 0.0
