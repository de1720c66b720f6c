"""Run a spec on a Ray cluster through the Ray Jobs API, and follow, list and stop jobs.

    gentrain submit vae/debug storage_path=s3://bucket/runs --address http://HEAD:8265
    gentrain status JOB          gentrain logs JOB --follow
    gentrain stop JOB            gentrain jobs

The spec is loaded, overridden and validated here, so a bad spec never reaches the
cluster; the resolved spec travels as a file in the uploaded working folder and the job
runs `gentrain run <that file>` on the head (gentrain must be installed there). The
driver on the cluster opens the MLflow run and prints its id early; `submit` waits for
that line (or `--no-wait`) and prints it with the job id.

Secrets come from this machine's environment, never from a spec: the Ray token
(RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) is only
sent as an `Authorization: Bearer` header; MLflow credentials
(MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) are forwarded in the job's runtime_env, where
anyone who may read the cluster's job list (the dashboard, `ray job list`) can see them.
Give the cluster its own credentials and pass `--no-credentials` where that matters.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from gentrain.launch.staging import stage_working_dir
from gentrain.schema import SpecError
from gentrain.paths import is_remote
from gentrain.spec import JobSpec, apply_overrides, read_yaml
from gentrain.validation import find_spec_file, from_dict

ADDRESS_ENV = "RAY_ADDRESS"
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
JOB_ID_ENV = "GENTRAIN_RAY_JOB_ID"  # the driver tags its MLflow run with it
SPEC_FILE = "gentrain-submitted-spec.yaml"
# What the driver prints once its MLflow run is open (launch/local.py); `submit` and
# `status` find the run by it.
RUN_LINE = re.compile(r"\[gentrain\] mlflow run: (?P<run_id>\w+) \| experiment: (?P<experiment>[^|]+?)"
                      r" \| (?P<pointer>.+)")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """Anything between here and the cluster that the user must fix; says how."""


# -- address and token ---------------------------------------------------------------
def resolve_address(address: str | None) -> str:
    address = (address or os.environ.get(ADDRESS_ENV, "")).strip()
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard, "
                           f"where the Jobs API lives) or set {ADDRESS_ENV}")
    if address == "auto" or address.startswith("ray://"):
        raise ClusterError(f"address {address!r}: the Jobs API needs the dashboard's HTTP address, "
                           "e.g. http://HEAD:8265")
    return address if "://" in address else f"http://{address}"


def read_token() -> tuple[str | None, str]:
    """(the Ray auth token or None, where it was looked for), as Ray itself looks."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "the environment variable RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    path = Path(path_env).expanduser() if path_env else Path.home() / ".ray" / "auth_token"
    source = f"the file {path}" + (" (RAY_AUTH_TOKEN_PATH)" if path_env else "")
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token, source
    return None, f"RAY_AUTH_TOKEN (unset) and {source} (missing or empty)"


@dataclass
class Cluster:
    """A Jobs API client whose failures read as what to do about them."""

    address: str

    def __post_init__(self):
        from ray.job_submission import JobSubmissionClient

        self.token, self.token_source = read_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = self.call(JobSubmissionClient, self.address, headers=headers)

    def call(self, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            if "Authentication required" in str(exc) or not self.token:
                raise ClusterError(
                    f"the Ray cluster at {self.address} requires a token and none was found: looked in "
                    f"{self.token_source}. Set RAY_AUTH_TOKEN to the cluster's token (on the head: "
                    "`ray get-auth-token`)") from None
            raise ClusterError(f"the Ray cluster at {self.address} rejected the token read from "
                               f"{self.token_source}; set RAY_AUTH_TOKEN to this cluster's token "
                               "(on the head: `ray get-auth-token`)") from None
        except ConnectionError:
            raise ClusterError(
                f"cannot reach the Ray Jobs API at {self.address}: is a head running there? Start one "
                "with `ray start --head --dashboard-host=0.0.0.0` (dashboard port 8265), or pass the "
                f"right --address / {ADDRESS_ENV}") from None
        except RuntimeError as exc:
            if "404" in str(exc) and "does not exist" in str(exc):
                raise ClusterError(f"no job {args[0] if args else ''!s} on {self.address}; "
                                   "`gentrain jobs` lists them") from None
            raise ClusterError(f"the Ray Jobs API at {self.address} answered: {exc}") from None

    def info(self, job_id: str):
        return self.call(self.client.get_job_info, job_id)

    def logs(self, job_id: str) -> str:
        return self.call(self.client.get_job_logs, job_id)

    def follow(self, job_id: str, out=sys.stdout) -> str:
        """Print the job's log as it grows until the job ends; its final status."""
        import asyncio

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        self.info(job_id)  # a missing job or a bad token fails here, clearly
        self.call(asyncio.run, tail())
        return self.wait(job_id, TERMINAL, timeout_s=60)

    def wait(self, job_id: str, statuses, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            status = str(self.info(job_id).status)
            if status in statuses or time.monotonic() > deadline:
                return status
            time.sleep(0.5)


# -- submit ---------------------------------------------------------------------------
def resolve_for_cluster(ref: str, overrides: list[str]) -> tuple[JobSpec, dict]:
    """Validate here (every problem at once, so a bad spec never reaches the cluster); the
    spec the cluster runs, with storage_path as the user wrote it."""
    path = find_spec_file(ref)
    data = apply_overrides(read_yaml(path), overrides)
    storage = str(data.get("storage_path", JobSpec.storage_path))
    problems = []
    if not is_remote(storage) and not os.path.isabs(storage):
        problems.append(
            f"storage_path: {storage!r} is relative; on a cluster it would land in the job's temporary "
            "working folder and be lost. Use storage every node sees: storage_path=s3://bucket/runs, "
            "gs://bucket/runs, or an absolute path on a shared file system")
    try:
        spec = from_dict(data, source=str(path))
    except SpecError as exc:
        raise SpecError(exc.problems + problems, str(path)) from None
    uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if spec.tracking.enabled and not uri:
        # The cluster may set its own (the Helm chart does); without one it tracks into a
        # SQLite file in the job's temporary folder.
        print("warning: tracking.uri and MLFLOW_TRACKING_URI are unset here: the job uses the cluster's "
              "own MLFLOW_TRACKING_URI if it has one, else a SQLite file that is lost with the job's "
              "folder. Set MLFLOW_TRACKING_URI to a server the cluster reaches", file=sys.stderr)
    elif spec.tracking.enabled and uri.startswith("sqlite:///") and not os.path.isabs(uri[len("sqlite:///"):]):
        problems.append(f"tracking.uri: {uri} is a relative SQLite file; on a cluster use an MLflow server")
    if problems:
        raise SpecError(problems, str(path))
    resolved = spec.to_dict()
    resolved["storage_path"] = storage  # this machine's resolved absolute path means nothing there
    return spec, resolved


def job_env(spec: JobSpec, job_id: str, forward_credentials: bool) -> tuple[dict, list[str]]:
    """(env_vars for the job's runtime_env, names of the credentials among them)."""
    env = {name: os.environ[name] for name in TRACKING_ENV if os.environ.get(name)}
    credentials = []
    if forward_credentials and spec.tracking.enabled:
        credentials = [name for name in CREDENTIAL_ENV if os.environ.get(name)]
        env.update({name: os.environ[name] for name in credentials})
    env[JOB_ID_ENV] = job_id
    return env, credentials


def new_job_id(spec: JobSpec) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", spec.name)[:40]
    return f"gentrain-{safe}-{uuid.uuid4().hex[:8]}"


def submit(ref: str, overrides: list[str], address: str | None, working_dir: str = ".",
           excludes: list[str] | None = None, forward_credentials: bool = True,
           job_id: str | None = None, command: list[str] | None = None,
           check=None) -> tuple[Cluster, str, JobSpec]:
    """Validate here, upload the working folder with the resolved spec, run `gentrain run
    SPEC` there; `command`: other gentrain arguments after the spec (a sweep's: `gentrain
    sweep --address`), `check(resolved)`: more checks of the resolved spec before submitting."""
    spec, resolved = resolve_for_cluster(ref, overrides)
    if check is not None:
        check(resolved)
    cluster = Cluster(resolve_address(address))
    job_id = job_id or new_job_id(spec)
    env, credentials = job_env(spec, job_id, forward_credentials)
    from gentrain.tracking.lineage import git_env

    env.update(git_env(working_dir))  # the cluster's copy of the working folder has no .git
    import yaml

    spec_text = yaml.safe_dump(resolved, sort_keys=False)
    with stage_working_dir(Path(working_dir), {SPEC_FILE: spec_text}, excludes or [],
                           skip=[spec.storage_path]) as staged:
        runtime_env = {"working_dir": str(staged), "env_vars": env}
        verb = command[0] if command else "run"
        entrypoint = shlex.join(["gentrain", verb, SPEC_FILE, *(command[1:] if command else [])])
        cluster.call(cluster.client.submit_job, entrypoint=entrypoint,
                      submission_id=job_id, runtime_env=runtime_env,
                      metadata={"gentrain.spec": spec.name, "gentrain.job_type": spec.job.type,
                                "gentrain.experiment": spec.tracking.experiment})
    if credentials:
        print(f"[gentrain] forwarded {', '.join(credentials)} to the job: visible to anyone who can "
              "read this cluster's job list (--no-credentials keeps them here)", file=sys.stderr)
    return cluster, job_id, spec


def find_run(log_text: str) -> dict | None:
    """The MLflow run the driver announced in its log, if it has yet."""
    match = RUN_LINE.search(log_text or "")
    return match.groupdict() if match else None


def wait_for_run(cluster: Cluster, job_id: str, timeout_s: float) -> tuple[str, dict | None]:
    """Poll until the driver announces its MLflow run or the job ends: (status, run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(cluster.info(job_id).status)
        run = find_run(cluster.logs(job_id))
        if run or status in TERMINAL or time.monotonic() > deadline:
            return status, run
        time.sleep(1.0)


def describe_run(run: dict | None, spec_experiment: str | None = None) -> list[str]:
    if run is None:
        where = f" in experiment {spec_experiment!r}" if spec_experiment else ""
        return [f"  mlflow run  : not opened yet{where} (`gentrain status JOB` shows it once it is)"]
    return [f"  mlflow run  : {run['run_id']} (experiment {run['experiment'].strip()})",
            f"  view it     : {run['pointer'].strip()}"]


def format_jobs(jobs) -> str:
    rows = [("JOB", "STATUS", "SPEC", "STARTED", "DURATION", "ENTRYPOINT")]
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        end = job.end_time or (time.time() * 1000 if job.start_time else None)
        duration = f"{(end - job.start_time) / 1000:.0f}s" if job.start_time and end else "-"
        spec = (job.metadata or {}).get("gentrain.spec", "-")
        entry = job.entrypoint if len(job.entrypoint) <= 40 else job.entrypoint[:37] + "..."
        rows.append((job.submission_id or job.job_id or "-", str(job.status), spec, start, duration, entry))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

