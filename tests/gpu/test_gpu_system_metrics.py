"""System metrics on a CUDA machine: rank 0's GPU memory reaches the run (through MLflow's
NVML monitor where nvidia-ml-py is installed, else torch's view of this process's device).

    .venv/bin/python -m pytest -q tests/gpu/test_gpu_system_metrics.py
"""

from __future__ import annotations

import time

import torch
from mlflow import MlflowClient

from gentrain.tracking import RunLogger, open_run
from gentrain.tracking.system import SystemMetrics


def test_gpu_memory_is_among_the_system_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "gpu-system-metrics", "a")
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB in use
    run_logger = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    monitor = SystemMetrics(run_logger, interval_s=0.3, torch_gpu=True).start()
    time.sleep(1.0)
    monitor.stop()
    assert run_logger.close(timeout=60) is True
    device = torch.cuda.current_device()
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    used = metrics[f"system/gpu_{device}_memory_usage_megabytes"]
    assert used >= 256 * 2**20 / 1e6, metrics
    assert 0 < metrics[f"system/gpu_{device}_memory_usage_percentage"] <= 100
    del held
