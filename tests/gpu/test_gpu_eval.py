"""Periodic FID/KID/IS (eval.metrics) on a CUDA device equal the same computation on the CPU.

    .venv/bin/python -m pytest -q tests/gpu/test_gpu_eval.py      # skipped without a GPU

Sampling, the Inception network (random weights with the standard keys: no weight file
can be downloaded) and the float64 all-reduces of the feature sums run on the GPU over
nccl, and on the CPU over gloo; the metrics must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gentrain.data.pack import pack_source
from gpu_world import periodic_metrics
from harness import run_world

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_inception import random_state_dict  # noqa: E402 - the unit tests' weight-file stand-in


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-eval")
    pack_source("digits", root / "digits", per_shard=200, progress=False)
    weights = root / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_state_dict(), weights)
    return {device: run_world(periodic_metrics, 1, args=(device, str(root / "digits"), str(weights),
                                                          str(root / f"cache-{device}")),
                              backend="nccl" if device == "cuda" else "gloo", timeout=600)[0]
            for device in ("cuda", "cpu")}


def test_metrics_on_gpu_equal_cpu(results):
    gpu, cpu = results["cuda"]["first"], results["cpu"]["first"]
    print({key: (gpu[key], cpu[key]) for key in gpu})  # the numbers quoted in notes (pytest -s)
    assert set(gpu) == set(cpu) and any(key.endswith("/fid") for key in gpu), gpu
    for key, value in gpu.items():
        assert value == value and abs(value) != float("inf"), (key, value)
        assert value == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), (key, value, cpu[key])


def test_cached_reference_gives_the_same_numbers(results):
    for device in ("cuda", "cpu"):
        first, second = results[device]["first"], results[device]["second"]
        for key in first:
            assert second[key] == pytest.approx(first[key], rel=1e-9), (device, key)
