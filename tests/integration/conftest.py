"""Fixtures for integration tests that need real services (an MLflow server)."""

from __future__ import annotations

import pytest

from mlflow_server import running_mlflow_server
from ports import free_port


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real MLflow server, started once per test session (about 7 s)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture
def dead_mlflow_uri() -> str:
    """An http URI on a free port: a tracking server that is down."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, gentrain_cache):
    """A real two-node Ray cluster on loopback (token auth on), started once per session.

    The second node cannot see `cluster.node_local_dir` where the kernel allows a mount
    namespace (see ray_head.py). Both nodes hold one `gentrain_test_slot`, so
    `scaling.resources_per_worker={CPU: 1, gentrain_test_slot: 1}` puts one worker on each.
    """
    from pathlib import Path

    from ray_head import running_ray_cluster

    here = str(Path(__file__).resolve().parent)  # workers import the multi-node probe from here
    with running_ray_cluster(tmp_path_factory.mktemp("ray-cluster"), second_node=True,
                             extra_pythonpath=[here]) as cluster:
        yield cluster
