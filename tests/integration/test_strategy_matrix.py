"""Every (job type, strategy, ZeRO stage, precision) a job type declares in `supports`
runs through `gentrain run` on a real Ray (2 workers, gloo): the bundled debug spec with
a few steps, evaluation at the start, in the middle and at the end (held-out metrics,
sample grid, or sample text for token families, the family's visuals), and a checkpoint
in the middle and at the end.

    .venv/bin/python -m pytest -q tests/integration/test_strategy_matrix.py                # CI's share
    .venv/bin/python -m pytest -q tests/integration/test_strategy_matrix.py --full-matrix  # all of it

The full matrix (every declared CPU case, ~25 s each on 2 idle cores) runs before any README claim about
strategies is written; CI runs CI_CASES, which hold every family, strategy, ZeRO stage
and precision at least once. fp16 cases need GPU workers: they are reported as skipped
here and run in tests/gpu.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import ray

from gentrain import cli
from gentrain.registry import ZERO_STAGES, Combination, job_types
from gentrain.validation import load_spec

pytestmark = pytest.mark.slow
CPU_PRECISIONS = ("fp32", "bf16")  # fp16 needs GPU workers (refused at validate time here)
STEPS = 6
# CI's share: every family, strategy, ZeRO stage and CPU precision at least once; the
# rest runs with --full-matrix. vae ddp-fp32 is also the whole-run test (test_run_vae.py).
CI_CASES = {
    ("vae", "ddp-fp32"), ("vae", "deepspeed-zero0-bf16"), ("vae", "deepspeed-zero1-fp32"),
    ("vae", "deepspeed-zero2-bf16"), ("vae", "deepspeed-zero3-fp32"), ("vae", "deepspeed-zero3-bf16"),
    ("vae", "accelerate-bf16"), ("vae", "fsdp-fp32"), ("gan", "ddp-bf16"), ("gan", "deepspeed-zero3-fp32"),
    ("gan", "accelerate-fp32"), ("classifier", "ddp-fp32"), ("transformer", "deepspeed-zero3-bf16"),
    ("pixelcnn", "ddp-bf16"),
    ("flow", "deepspeed-zero3-bf16"),  # ActNorm's first-step init through ZeRO-3's hooks, bf16 weights
    ("rbm", "deepspeed-zero2-fp32"),  # Gibbs sampling inside the engine's forward, AIS on the gathered weights
    ("ebm", "ddp-bf16"),  # Langevin on the unwrapped fp32 network, the loss under autocast
    ("diffusion", "accelerate-bf16"),  # EMA weights and the float64 bound over a bf16 network
}


def declared() -> list[tuple[str, Combination]]:
    """What the job types say they train under, nothing filtered out."""
    return [(name, combo) for name, job_type in sorted(job_types().items())
            for combo in job_type.supports.combinations()]


def cases() -> list:
    params = []
    for name, combo in declared():
        marks = []
        if (name, str(combo)) not in CI_CASES:
            marks.append(pytest.mark.full_matrix)
        params.append(pytest.param(name, combo, id=f"{name}-{combo}", marks=marks))
    return params


def test_ci_share_covers_every_family_strategy_stage_and_precision():
    cpu = [(name, combo) for name, combo in declared() if combo.precision in CPU_PRECISIONS]
    chosen = [(name, combo) for name, combo in cpu if (name, str(combo)) in CI_CASES]
    assert {(name, str(combo)) for name, combo in chosen} == CI_CASES, "CI_CASES names an undeclared case"
    assert {name for name, _ in chosen} == {name for name, _ in cpu}
    assert {combo.strategy for _, combo in chosen} == {combo.strategy for _, combo in cpu}
    assert {combo.precision for _, combo in chosen} == set(CPU_PRECISIONS)
    assert {combo.zero_stage for _, combo in chosen if combo.strategy == "deepspeed"} == set(ZERO_STAGES)


@pytest.fixture(scope="module")
def embedded_ray():
    """One embedded Ray for the module: the first `gentrain run` starts it as a user's
    would (gentrain.launch.local.init_ray), the others find it running."""
    yield
    ray.shutdown()


@pytest.mark.parametrize("job,combo", cases())
def test_gentrain_run_under_every_declared_combination(job, combo, embedded_ray, tmp_path, capsys):
    if combo.precision not in CPU_PRECISIONS:
        pytest.skip(f"{combo.precision} needs GPU workers: tests/gpu runs it")
    overrides = combo.overrides + [
        f"storage_path={tmp_path}", f"train.steps={STEPS}", "train.log_every=3",
        "train.schedule.warmup_steps=1", "checkpoint.every=3", "eval.every=3", "eval.max_batches=2",
        "tracking.enabled=false", "scaling.num_workers=2"]
    spec = load_spec(f"{job}/debug", overrides)  # a declared combination must validate
    assert cli.main(["run", f"{job}/debug", *overrides]) == 0, capsys.readouterr().err[-3000:]
    # Every held-out metric of every evaluation is finite (an fsdp copy once evaluated with
    # an uninitialised, untied head: a run that ended, with perplexity inf).
    evaluations = re.findall(r"eval at step (\d+) \|(.*)", capsys.readouterr().out)
    assert [int(step) for step, _ in evaluations] == [0, 3, STEPS], evaluations
    for step, line in evaluations:
        parts = [part.split() for part in line.split(" | ") if part.strip() and not part.startswith("+")]
        values = {name: float(value) for name, value in parts}  # "+N more in MLflow" aside
        assert values and all(math.isfinite(v) for v in values.values()), (step, values)
    run_dir = Path(spec.run_dir)
    final = run_dir / f"step-{STEPS:08d}"
    assert json.loads((final / "gentrain.json").read_text())["step"] == STEPS
    suffix = ".txt" if job_types()[job].data_kinds == ("tokens",) else ".png"  # token samples are text
    grids = sorted(p.name for p in (run_dir / "samples").glob("step-*.*"))
    assert grids == [f"step-{s:08d}{suffix}" for s in (0, 3, STEPS)], grids  # start, middle, end
