"""Fixtures for integration tests that need real services (an MLflow server)."""

from __future__ import annotations

import pytest

from mlflow_server import free_port, running_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real MLflow server, started once per test session (about 7 s)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture
def dead_mlflow_uri() -> str:
    """An http URI on a free port: a tracking server that is down."""
    return f"http://127.0.0.1:{free_port()}"
