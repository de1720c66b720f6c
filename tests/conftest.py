"""Shared test setup.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit -q
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The source roots, so the suite also runs from a checkout that is not pip-installed.
for source_root in (ROOT / "platform", ROOT / "jobs"):
    if str(source_root) not in sys.path:
        sys.path.insert(0, str(source_root))
# Ray Train's controller takes a worker's report every 2 s by default, and a worker's next
# report waits for it: a test run checkpointing every few steps would spend most of its
# time there. Set before any Ray starts, so every embedded Ray and `gentrain` subprocess
# the tests start inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# What `gentrain run` sets for its embedded Ray (PREEMPTION_WATCHER_ENV in launch/local.py,
# not imported here: that would put torch's 4 s import in front of every test run), for the
# tests that start one themselves. The test Ray cluster (integration/ray_head.py) starts
# without RAY_* vars.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session", autouse=True)
def gentrain_cache(tmp_path_factory):
    """Keep `builtin:NAME` packs in a temporary cache, never in the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("gentrain-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENTRAIN_CACHE", os.fspath(cache))
        yield cache


def pytest_addoption(parser):
    parser.addoption("--full-matrix", action="store_true",
                     help="run every declared (job type, strategy, ZeRO stage, precision) through "
                     "`gentrain run`, not only CI's share (tests/integration/test_strategy_matrix.py)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--full-matrix"):
        kept = [item for item in items if item.get_closest_marker("full_matrix") is None]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in kept])
            items[:] = kept
    _cluster_tests_last(items)


def _cluster_tests_last(items):
    """Tests on the session's two-node Ray cluster run last, together (a stable sort keeps
    every other order). Up, that cluster holds about 2 GB and a share of the 2 cores until
    the session ends; last, it lives only while its own tests run, and its raylets start
    on an idle machine rather than beside another test's embedded Ray."""
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))
