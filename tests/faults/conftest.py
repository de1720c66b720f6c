"""Fixtures for the fault suite: an MLflow server that a test can stop and restart.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults -q
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from mlflow_server import running_mlflow_server  # noqa: E402 - after its folder is on the path

from ports import free_port  # noqa: E402
from runs import NAME, gentrain_run  # noqa: E402 - tests/faults is on the path (rootdir-less test folder)


class RestartableServer:
    """A real `mlflow server` on a fixed port and store: stop() kills it (SIGKILL: clients
    then get "connection refused"), start() brings it back with the same data at the same URI."""

    def __init__(self, directory: Path):
        self.directory, self.port = directory, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._running: contextlib.ExitStack | None = None

    def start(self) -> str:
        if self._running is None:
            stack = contextlib.ExitStack()
            stack.enter_context(running_mlflow_server(self.directory, port=self.port, kill=True))
            self._running = stack
        return self.uri

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


@pytest.fixture(scope="session")
def _restartable_server(tmp_path_factory):
    server = RestartableServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def restartable_mlflow(_restartable_server):
    """The session's restartable server, up (about 7 s to start; shared by the tests, which
    keep to their own experiments)."""
    _restartable_server.start()
    return _restartable_server


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The run directory of one uninterrupted run with runs.SETTINGS (step-2 ... step-12
    folders): the weights every interrupted run of the suite must end with."""
    from gentrain.checkpoint import RAY_SNAPSHOT_FILE

    storage = tmp_path_factory.mktemp("reference") / "runs"
    gentrain_run(storage)
    run_dir = storage / NAME
    assert (run_dir / RAY_SNAPSHOT_FILE).is_file()  # Ray registered every folder: its snapshot names them
    return run_dir
