"""A real Ray cluster on loopback for tests: a head with token authentication on, and a
second node that joins it with `ray start --address`.

    with running_ray_cluster(tmp_dir, second_node=True) as cluster:
        JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_header)

Every port is a free one (never Ray's defaults, which another Ray on the machine may
hold), every process runs in its own session and is stopped by its process group: never
`ray stop`, which kills every Ray on the machine.

The second node, where the kernel lets us (root or user namespaces), runs in its own
mount namespace with an empty tmpfs over `cluster.node_local_dir`: a folder the head
sees and the second node does not, as on two machines whose local disks differ. That is
what lets a test show that the shared-storage check catches a path one node lacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port

READY_TIMEOUT_S = 90.0
SECOND_NODE_RESOURCE = "gentrain_test_node_b"
HEAD_RESOURCE = "gentrain_test_node_a"
SLOT_RESOURCE = "gentrain_test_slot"  # one per node: a worker asking for it gets a node of its own
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # tiny: the tests move almost nothing through it


@dataclass
class RayCluster:
    dashboard_url: str
    gcs_address: str
    token: str
    env: dict[str, str]  # what a process that runs `ray`/`gentrain` against it needs
    node_local_dir: Path | None = None  # seen by the head only (None: no isolation here)
    log_dir: Path | None = None
    temp_dir: Path | None = None  # Ray's session folder (the head's; the second node's is under it)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _ray_executable() -> str:
    executable = Path(sys.executable).parent / "ray"
    if not executable.exists():
        raise RuntimeError(f"no ray executable beside {sys.executable}: pip install 'ray[default]'")
    return str(executable)


def node_env(token: str, extra_pythonpath: list[str]) -> dict[str, str]:
    """The environment of a test node: this venv first on PATH (the job entrypoint runs
    `gentrain`), token auth on with a token of its own (never ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([*extra_pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               # Train's controller polls every 2 s by default; a short test run waits on it.
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    return env


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        "--min-worker-port=0", "--max-worker-port=0",  # 0: the OS picks, so nodes never collide
    ]


def _start(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every node's process group at once; after a grace, SIGKILL the groups so no
    raylet or worker outlives the test."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        deadline = time.monotonic() + 10
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _ray_logs(temp_dir: Path | None, lines: int = 15) -> str:
    """The ends of the raylet's and GCS's own logs: `ray start` says only that the node
    "timed out during startup"; these say why."""
    if temp_dir is None:
        return ""
    logs = temp_dir / "session_latest" / "logs"
    parts = [f"--- {path.name}:\n{_tail(path, lines)}"
             for pattern in ("raylet*.err", "raylet*.out", "gcs_server*.err", "gcs_server*.out")
             for path in sorted(logs.glob(pattern)) if path.stat().st_size]
    return "\n".join(parts)


class NodeStartError(RuntimeError):
    pass


def _wait(ready, processes: list[subprocess.Popen], what: str, log_path: Path,
          temp_dir: Path | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise NodeStartError(f"{what}: `ray start` exited with {process.returncode}; "
                                     f"{log_path} ends:\n{_tail(log_path)}\n{_ray_logs(temp_dir)}")
        if ready():
            return
        time.sleep(0.25)
    raise NodeStartError(f"{what} not ready after {READY_TIMEOUT_S:.0f} s; {log_path} ends:\n"
                         f"{_tail(log_path)}\n{_ray_logs(temp_dir)}")


def _dashboard_up(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _alive_nodes(url: str, token: str) -> int:
    request = urllib.request.Request(f"{url}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            summary = json.load(response)["data"]["summary"]
    except (OSError, KeyError, ValueError):
        return 0
    return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")


def mount_isolation_prefix(hidden: Path) -> list[str] | None:
    """A command prefix that runs a command in a new mount namespace with an empty tmpfs
    over `hidden`, or None where this kernel or user may not do that."""
    if shutil.which("unshare") is None:
        return None
    for userns in ([], ["--map-root-user"]):
        prefix = ["unshare", "--mount", "--propagation", "private", *userns]
        probe = subprocess.run([*prefix, "sh", "-c", f'mount -t tmpfs tmpfs "{hidden}"'],
                               capture_output=True, timeout=10)
        if probe.returncode == 0:
            return prefix
    return None


START_ATTEMPTS = 2


@contextlib.contextmanager
def running_ray_cluster(directory: Path, second_node: bool = False,
                        extra_pythonpath: list[str] | None = None) -> Iterator[RayCluster]:
    """A head (and optionally a second node) with logs and Ray's session under `directory`.

    A node that fails to come up is retried once on fresh ports: on 2 busy cores a raylet
    can miss `ray start`'s fixed 30 s registration deadline. Both attempts' logs are kept.
    """
    directory = Path(directory).resolve()
    failures = []
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            cluster = _start_cluster(directory / f"attempt-{attempt}", second_node, extra_pythonpath or [])
        except NodeStartError as exc:
            failures.append(f"attempt {attempt}: {exc}")
            continue
        try:
            yield cluster
        finally:
            _stop_cluster(cluster)
        return
    raise RuntimeError("the test Ray cluster did not start:\n" + "\n\n".join(failures))


def _start_cluster(directory: Path, second_node: bool, extra_pythonpath: list[str]) -> RayCluster:
    directory.mkdir(parents=True, exist_ok=True)
    # Ray's session path must stay short: unix socket paths are limited to 107 bytes.
    temp_dir = Path(f"/tmp/gtr-{os.getpid()}-{secrets.token_hex(3)}")
    token = secrets.token_hex(32)
    env = node_env(token, extra_pythonpath)
    gcs_port, dashboard_port = free_port(), free_port()
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    ray = _ray_executable()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
    head_log = directory / "ray-head.log"
    head = _start([ray, "start", "--head", *common, f"--port={gcs_port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                   f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
                   f"--resources={json.dumps({HEAD_RESOURCE: 1, SLOT_RESOURCE: 1})}", *_node_ports()], env, head_log)
    cluster = RayCluster(dashboard_url, f"127.0.0.1:{gcs_port}", token, env, log_dir=directory,
                         temp_dir=temp_dir, processes=[head])
    try:
        _wait(lambda: _dashboard_up(dashboard_url, token) and _alive_nodes(dashboard_url, token) >= 1,
              [head], "ray head", head_log, temp_dir)
        if second_node:
            _start_second_node(cluster, ray, common, directory)
    except BaseException:
        _stop_cluster(cluster)
        raise
    return cluster


def _stop_cluster(cluster: RayCluster) -> None:
    _stop_all(cluster.processes)
    if cluster.temp_dir is not None:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _start_second_node(cluster: RayCluster, ray: str, common: list[str], directory: Path) -> None:
    hidden = directory / "node-local"
    hidden.mkdir(exist_ok=True)
    prefix = mount_isolation_prefix(hidden)
    command = [ray, "start", f"--address={cluster.gcs_address}", *common,
               f"--resources={json.dumps({SECOND_NODE_RESOURCE: 1, SLOT_RESOURCE: 1})}", *_node_ports()]
    if prefix is not None:
        quoted = " ".join(f"'{part}'" for part in command)
        command = [*prefix, "sh", "-c", f'mount -t tmpfs tmpfs "{hidden}" && exec {quoted}']
        cluster.node_local_dir = hidden
    log_path = directory / "ray-node-b.log"
    cluster.processes.append(_start(command, cluster.env, log_path))
    _wait(lambda: _alive_nodes(cluster.dashboard_url, cluster.token) >= 2,
          cluster.processes, "second ray node", log_path, cluster.temp_dir)
