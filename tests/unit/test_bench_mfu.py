"""`gentrain bench mfu` on the debug transformer for a moment, and what its FLOP count means.
Nothing here is timed: the tests check what the benchmark counts and writes, never how fast
anything is (`gentrain bench scaling` and `bench checkpoint` spawn worlds and are run by hand).

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_bench_mfu.py -q
"""

import contextlib
import io
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gentrain.bench.mfu import MODELS, build_engine, cpu_attention_formulas, run_mfu_bench, synthetic_batches
from gentrain.bench.scaling import CONFIGURATIONS, _ratios


def test_writes_valid_json_with_a_counted_row_and_prints_it(tmp_path):
    json_path = tmp_path / "bench-mfu.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = run_mfu_bench(models=("transformer-debug",), seconds=0.0, warmup=0, json_path=str(json_path),
                                 matmul_size=64, peak_window_seconds=0.01)
    written = json.loads(json_path.read_text())
    assert written == returned and written["benchmark"] == "mfu"
    (row,) = written["rows"]
    assert row["model"] == "transformer-debug" and row["timed_steps"] >= 2
    for key in ("flops_per_step", "seconds_per_step", "median_seconds_per_step", "mfu", "median_step_mfu",
                "parameters", "threads"):
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, key
    assert row["mfu"] == pytest.approx(row["flops_per_step"] / row["seconds_per_step"]
                                       / written["peak_flops_per_s"]["used"])
    assert any(line.split()[:1] == ["transformer-debug"] for line in printed.getvalue().splitlines())


def test_a_counted_step_is_three_forwards_plus_the_attention_backward():
    """Forward and backward both counted: a matmul's backward is two matmuls of its size
    (gradients of input and weight), and torch's attention backward is 2.5 forwards."""
    model = MODELS["transformer-debug"]
    engine, batch_size = build_engine(model, torch.device("cpu"))
    batches = synthetic_batches(model.data_info, batch_size, torch.device("cpu"))
    tokens = next(synthetic_batches(model.data_info, batch_size, torch.device("cpu")))["tokens"]
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as step:
        engine.optimizer_step(batches)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as forward:
        engine.strategy.unwrap("transformer")(tokens)
    counts = {str(op): flops for op, flops in step.get_flop_counts()["Global"].items()}
    attention = [flops for op, flops in counts.items() if "attention" in op and "backward" not in op]
    assert attention, f"the attention is counted: {counts}"
    config = engine.config  # per layer: 2 matmuls of (T x d) by (d x T) over batch x heads
    expected_attention = config.layers * 2 * (2 * batch_size * 128 * 128 * config.d_model)
    assert sum(attention) == expected_attention
    assert step.get_total_flops() == 3 * forward.get_total_flops() + expected_attention // 2


def test_scaling_ratios_are_each_rounds_rates_over_the_one_worker_rates():
    rates = {CONFIGURATIONS[0][0]: 10.0, CONFIGURATIONS[1][0]: 18.0, CONFIGURATIONS[2][0]: 15.0}
    rows = [{"round": r, "configuration": label, "samples_per_s": rates[label] * (r + 1)}
            for r in range(2) for label in rates]
    ratios = _ratios(rows, 2)
    assert ratios["median"] == pytest.approx({"two_workers_over_one": 1.8,
                                              "two_workers_over_one_with_all_threads": 1.2,
                                              "two_threads_over_one": 1.5})
