"""The embedded Ray of `gentrain run` keeps to itself: anything in its workers that finds
"the" cluster by auto-detection (Ray Train's placement-group cleaner queries the state
API that way) is pinned to this Ray's dashboard, so a second Ray on the machine (another
user's run, a test suite) cannot make it fail with "Found multiple active Ray instances".

    .venv/bin/pytest tests/integration/test_embedded_ray.py -q
"""

from __future__ import annotations

import pytest
import ray

from gentrain.launch import console
from gentrain.launch.local import API_SERVER_ENV, cluster_address, init_ray
from gentrain.validation import load_spec

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0)
class StateProbe:
    def where(self) -> tuple[str | None, str]:
        import os

        from ray.dashboard.utils import get_address_for_submission_client

        return os.environ.get(API_SERVER_ENV), get_address_for_submission_client(None)


def test_workers_find_their_own_embedded_ray_and_the_console_is_installed(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.skip("a Ray started by another test is up in this process")
    init_ray(load_spec("vae/debug", [f"storage_path={tmp_path}"]))
    try:
        dashboard = ray._private.worker._global_node.address_info["webui_url"]  # noqa: SLF001
        pinned, resolved = ray.get(StateProbe.remote().where.remote())
        assert pinned == resolved == f"http://{dashboard}"
        assert console.current() is not None  # Ray's prefixed printer replaced
        assert cluster_address() is None  # the driver's RAY_ADDRESS untouched: the next run embeds again
    finally:
        ray.shutdown()
