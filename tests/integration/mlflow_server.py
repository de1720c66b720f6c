"""A real MLflow tracking server for tests, small and local.

    with running_mlflow_server(tmp_dir) as uri:
        MlflowClient(tracking_uri=uri).search_experiments()

Started as the docs for this machine say (ENVIRONMENT.md): job execution off and one
worker, which makes it ready in about 7 s and 0.5 GiB instead of 25 s and 2 GiB.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ports import free_port

READY_TIMEOUT_S = 90.0


def _mlflow_executable() -> str:
    # The one installed beside this interpreter, not whichever `mlflow` is first on PATH.
    executable = Path(sys.executable).parent / "mlflow"
    if not executable.exists():
        raise RuntimeError(f"no mlflow executable beside {sys.executable}: "
                           "install mlflow into this environment (pip install mlflow)")
    return str(executable)


def _wait_until_healthy(process: subprocess.Popen, uri: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode} before it was "
                               f"ready; its log ({log_path}) ends:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {READY_TIMEOUT_S:.0f} s; "
                       f"its log ({log_path}) ends:\n{_tail(log_path)}")


def _tail(log_path: Path, lines: int = 30) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen, kill: bool = False) -> None:
    # The server forks workers: signal its whole process group, not just the parent.
    steps = ((signal.SIGKILL, 5),) if kill else ((signal.SIGTERM, 10), (signal.SIGKILL, 5))
    for sig, grace_s in steps:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running_mlflow_server(directory: Path, port: int | None = None,
                          kill: bool = False) -> Iterator[str]:
    """Run `mlflow server` with its store and artifacts under `directory`; yield its URI.
    Give the `port` of an earlier server on the same `directory` to restart that one;
    `kill`: end it with SIGKILL at once (a crash), not SIGTERM."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        _mlflow_executable(), "server",
        "--backend-store-uri", f"sqlite:///{directory.resolve() / 'mlflow.db'}",
        "--artifacts-destination", str(directory.resolve() / "art"),
        "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = directory / "server.log"
    with log_path.open("ab") as log_file:  # a restart appends
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_until_healthy(process, uri, log_path)
        yield uri
    finally:
        _stop(process, kill)
