"""End to end through Ray Train: `gentrain run` trains on 2 workers under DeepSpeed ZeRO-3,
then the same run continues on 1 worker under DDP from the strategy-neutral state, saying so,
and its data position goes on from the global batch the 2 workers reached.
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
COMMON = ["tracking.enabled=false", "train.schedule.warmup_steps=1", "job.config.channels=[8,16]", "train.batch_size=16", "train.log_every=2",
          "checkpoint.every=2", "eval.every=0", "eval.num_samples=4", "eval.max_batches=1",
          "job.config.iwae_samples=2", "job.config.iwae_chunk=2"]


def gentrain_run(workdir: Path, *overrides: str) -> str:
    result = subprocess.run([GENTRAIN, "run", "vae/debug", f"storage_path={workdir / 'runs'}", *COMMON, *overrides],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"gentrain run failed ({result.returncode}):\n{out[-6000:]}"
    return out


def test_two_zero3_workers_then_one_ddp_worker(tmp_path):
    gentrain_run(tmp_path, "train.steps=2", "scaling.num_workers=2", "strategy.name=deepspeed",
                 "strategy.zero_stage=3")
    run_dir = tmp_path / "runs" / "vae-debug"
    saved = torch.load(run_dir / "step-00000002" / "model.pt", weights_only=True)["networks"]["vae"]
    out = gentrain_run(tmp_path, "train.steps=4", "scaling.num_workers=1", "strategy.name=ddp")
    assert ("resuming 2 workers deepspeed-zero3 checkpoint on 1 worker ddp: optimizer state re-sharded "
            "from the strategy-neutral files") in out
    assert "resumed from step 2" in out
    meta = json.loads((run_dir / "step-00000004" / "gentrain.json").read_text())
    assert meta["world_size"] == 1
    # 2 workers x 2 steps of the epoch dealt to 2, then 2 steps of the single worker.
    assert meta["data_position"] == {"epoch": 0, "deal_world": 2, "global_batch": 6}
    later = torch.load(run_dir / "step-00000004" / "model.pt", weights_only=True)["networks"]["vae"]
    assert saved.keys() == later.keys() and any(not torch.equal(saved[k], later[k]) for k in saved)
