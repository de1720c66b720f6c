"""Every job type runs under every strategy and precision it lists in `supports`, on a
real Ray (2 workers, gloo): a few steps, a checkpoint, evaluation and a sample grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from gentrain.launch.local import run
from gentrain.registry import job_types
from gentrain.schema import SpecError
from gentrain.spec import load_spec

pytestmark = pytest.mark.slow
CPU_PRECISIONS = ("fp32", "bf16")  # fp16 needs GPU workers (refused at validate time)
# Each case costs about 25 s of Ray Train start-up on 2 cores; these train through Ray
# elsewhere already: the classifier (ddp only, a plain supervised step) in
# test_eval_cli.py, the VAE under ddp in fp32 in test_run_vae.py (the whole run, resume,
# MLflow) and test_fault_tolerance.py.
JOBS_COVERED_ELSEWHERE = {"classifier"}
CASES_COVERED_ELSEWHERE = {("vae", "ddp", "fp32")}


def matrix() -> list[tuple[str, str, str]]:
    cases = []
    for name, job_type in sorted(job_types().items()):
        if name in JOBS_COVERED_ELSEWHERE:
            continue
        for strategy in job_type.supports.strategies:
            for precision in CPU_PRECISIONS:
                if (name, strategy, precision) in CASES_COVERED_ELSEWHERE:
                    continue
                # A job type's own `validate` may refuse a combination (with the reason).
                if precision in job_type.supports.precisions and accepted(name, strategy, precision):
                    cases.append((name, strategy, precision))
    return cases


def accepted(job: str, strategy: str, precision: str) -> bool:
    try:
        load_spec(f"{job}/debug", [f"strategy.name={strategy}", f"strategy.precision={precision}"])
    except SpecError:
        return False
    return True


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize("job,strategy,precision", matrix())
def test_runs_under_every_supported_strategy(job, strategy, precision, local_ray, tmp_path):
    overrides = [f"strategy.name={strategy}", f"strategy.precision={precision}",
                 f"storage_path={tmp_path}", "train.steps=4", "train.log_every=2", "train.schedule.warmup_steps=1",
                 "checkpoint.every=4", "eval.every=0", "eval.max_batches=1",
                 "tracking.enabled=false", "scaling.num_workers=2"]
    spec = None
    if strategy == "deepspeed":  # ZeRO-2 where the job type accepts it, else ZeRO-0
        try:
            spec = load_spec(f"{job}/debug", overrides + ["strategy.zero_stage=2"])
        except SpecError as error:
            assert any(p.startswith("strategy.zero_stage:") for p in error.problems), error
    spec = spec or load_spec(f"{job}/debug", overrides)
    summary = run(spec)
    final = Path(summary.checkpoint)
    assert final.name == "step-00000004"
    assert json.loads((final / "gentrain.json").read_text())["step"] == 4
    assert summary.samples and Path(summary.samples).is_file()
