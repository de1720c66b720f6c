"""GPU tests: the strategies on a real CUDA device (nccl), skipped on machines without one.

    .venv/bin/python -m pytest -q tests/gpu

CI has no GPU, so these run where one is lent; the rank functions reuse
tests/distributed/harness.py (a real process group, here one nccl rank per device).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (tests/gpu runs where a GPU is lent)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
