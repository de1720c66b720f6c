"""The embedded Ray of `gentrain run` starts only what a run on this machine uses and keeps
to itself.

- By default no dashboard: its start competes with the workers' for the cores. Ray
  Train's placement-group cleaner, whose state queries need one, is left out with it
  (launch.trainer.GentrainTrainer), so nothing queries a state API that is not there.
- GENTRAIN_RAY_DASHBOARD=1 starts the dashboard; anything in the workers that finds "the"
  cluster by auto-detection (the cleaner's state queries) is pinned to this Ray's
  dashboard, so a second Ray on the machine (another user's run, a test suite) cannot make
  it fail with "Found multiple active Ray instances".

    .venv/bin/pytest tests/integration/test_embedded_ray.py -q
"""

from __future__ import annotations

import pytest
import ray
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from gentrain.launch import console
from gentrain.launch.local import API_SERVER_ENV, DASHBOARD_ENV, cluster_address, init_ray
from gentrain.launch.trainer import build_trainer
from gentrain.validation import load_job, load_spec

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0)
class StateProbe:
    def where(self) -> tuple[str | None, str]:
        import os

        from ray.dashboard.utils import get_address_for_submission_client

        return os.environ.get(API_SERVER_ENV), get_address_for_submission_client(None)


@ray.remote(num_cpus=0)
def state_api_seen_from_a_worker() -> bool:
    from gentrain.launch.raystate import state_api_available

    return state_api_available()  # a sweep's trial builds its trainer in a worker


def _cleaner_in(tmp_path) -> bool:
    job = load_job("vae/debug", [f"storage_path={tmp_path}"])
    trainer = build_trainer(job, run_id=None, tracking_uri=None)
    return any(isinstance(c, PlacementGroupCleanerCallback) for c in trainer._create_default_callbacks())  # noqa: SLF001


@pytest.fixture
def embedded(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.skip("a Ray started by another test is up in this process")
    yield
    ray.shutdown()


def test_the_default_embedded_ray_has_no_dashboard_and_no_state_queries(embedded, monkeypatch, tmp_path):
    monkeypatch.delenv(DASHBOARD_ENV, raising=False)
    init_ray(load_spec("vae/debug", [f"storage_path={tmp_path}"]))
    assert not ray._private.worker.get_dashboard_url()  # noqa: SLF001
    assert not _cleaner_in(tmp_path)
    assert not ray.get(state_api_seen_from_a_worker.remote())
    assert console.current() is not None  # Ray's prefixed printer replaced
    assert cluster_address() is None  # the driver's RAY_ADDRESS untouched: the next run embeds again


def test_with_the_dashboard_workers_find_their_own_embedded_ray(embedded, monkeypatch, tmp_path):
    monkeypatch.setenv(DASHBOARD_ENV, "1")
    init_ray(load_spec("vae/debug", [f"storage_path={tmp_path}"]))
    dashboard = ray._private.worker._global_node.address_info["webui_url"]  # noqa: SLF001
    pinned, resolved = ray.get(StateProbe.remote().where.remote())
    assert pinned == resolved == f"http://{dashboard}"
    assert _cleaner_in(tmp_path)  # Ray Train's own set, unchanged
    assert ray.get(state_api_seen_from_a_worker.remote())
    assert console.current() is not None
    assert cluster_address() is None
