"""Distributed tests: real gloo process groups of 2 CPU processes (see harness.py)."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def deepspeed_on_cpu():
    # DeepSpeed picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield
