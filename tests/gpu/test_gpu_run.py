"""`gentrain run` through Ray Train with `scaling.use_gpu: true` (skipped without CUDA): Ray
places each worker on a GPU, the workers join an nccl group, train, checkpoint, and the run
continues on another number of workers.

    .venv/bin/python -m pytest -q tests/gpu/test_gpu_run.py

One worker per GPU: NCCL refuses two ranks of one group on the same device ("Duplicate GPU
detected"), so on a machine with one GPU the run has 1 worker, and the continuation after
it 1 worker too; with 2 GPUs or more it trains on 2 and continues on 1 (the strategy-neutral
checkpoint, re-sharded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
GENTRAIN = str(Path(sys.executable).parent / "gentrain")
COMMON = ["scaling.use_gpu=true", "tracking.enabled=false", "train.schedule.warmup_steps=1", "train.log_every=2",
          "checkpoint.every=2", "eval.every=0", "eval.num_samples=4", "eval.max_batches=1",
          "job.config.iwae_samples=2", "job.config.iwae_chunk=2", "strategy.precision=bf16"]


def gentrain_run(workdir: Path, *overrides: str) -> str:
    result = subprocess.run([GENTRAIN, "run", "vae/debug", f"storage_path={workdir / 'runs'}", *COMMON, *overrides],
                            cwd=workdir, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"gentrain run failed ({result.returncode}):\n{out[-6000:]}"
    return out


@pytest.mark.parametrize("strategy", [["strategy.name=ddp"], ["strategy.name=deepspeed", "strategy.zero_stage=3"],
                                      ["strategy.name=fsdp"]], ids=["ddp", "zero3", "fsdp"])
def test_gentrain_run_on_gpus_then_continue_on_one(tmp_path, strategy):
    first = min(2, torch.cuda.device_count())
    out = gentrain_run(tmp_path, "train.steps=4", f"scaling.num_workers={first}", *strategy)
    assert "[gentrain] step 4/4" in out
    run_dir = tmp_path / "runs" / "vae-debug"
    weights = torch.load(run_dir / "step-00000004" / "model.pt", weights_only=True)["networks"]["vae"]
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
    out = gentrain_run(tmp_path, "train.steps=6", "scaling.num_workers=1", "strategy.name=ddp")
    assert "resumed from step 4" in out and "[gentrain] step 6/6" in out
    meta = json.loads((run_dir / "step-00000006" / "gentrain.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 6
