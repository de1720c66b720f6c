"""The cluster verbs of the `gentrain` command (see gentrain.launch.remote).

    gentrain submit vae/debug storage_path=/shared/runs --address http://HEAD:8265 [--no-wait|--follow]
    gentrain status JOB | gentrain logs JOB [--follow] | gentrain stop JOB | gentrain jobs
"""

from __future__ import annotations

import argparse
import sys
import time

ADDRESS_HELP = "the Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"


def add_cluster_commands(commands) -> None:
    submit = commands.add_parser("submit", help="run a spec on a Ray cluster (Ray Jobs API)")
    submit.add_argument("spec", help="a bundled spec (vae/debug) or a YAML file")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="override spec fields")
    submit.add_argument("--address", default=None, help=ADDRESS_HELP)
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", action="store_true",
                      help="return once submitted (default: wait until the MLflow run is open)")
    mode.add_argument("--follow", action="store_true",
                      help="stream the job's log until it ends; exit 0 only if it SUCCEEDED")
    submit.add_argument("--working-dir", default=".",
                        help="folder uploaded as the job's working folder (default: .)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave matching files/folders out of the upload (repeatable)")
    submit.add_argument("--no-credentials", action="store_true",
                        help="do not forward MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN to the job")
    submit.add_argument("--job-id", default=None, help="the submission id (default: gentrain-<name>-<random>)")
    submit.add_argument("--wait-timeout", type=float, default=300.0,
                        help="seconds to wait for the MLflow run to open (default 300)")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", help="a submitted job's status and MLflow run")
    status.add_argument("job", help="the job id `submit` printed")
    status.add_argument("--address", default=None, help=ADDRESS_HELP)
    status.set_defaults(handler=cmd_status)

    logs = commands.add_parser("logs", help="a submitted job's log")
    logs.add_argument("job")
    logs.add_argument("--address", default=None, help=ADDRESS_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=cmd_logs)

    stop = commands.add_parser("stop", help="stop a submitted job and wait until it is STOPPED")
    stop.add_argument("job")
    stop.add_argument("--address", default=None, help=ADDRESS_HELP)
    stop.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    stop.set_defaults(handler=cmd_stop)

    jobs = commands.add_parser("jobs", help="list the cluster's jobs")
    jobs.add_argument("--address", default=None, help=ADDRESS_HELP)
    jobs.set_defaults(handler=cmd_jobs)


def _cluster(args):
    from gentrain.launch.remote import Cluster, resolve_address

    return Cluster(resolve_address(args.address))


def _address_flag(args) -> str:
    return f" --address {args.address}" if args.address else ""


def cmd_submit(args: argparse.Namespace) -> int:
    from gentrain.launch.remote import describe_run, find_run, submit, wait_for_run

    cluster, job_id, spec = submit(args.spec, args.overrides, args.address, args.working_dir,
                                   args.exclude, not args.no_credentials, args.job_id)
    print(f"[gentrain] submitted {spec.name} to {cluster.address} as job {job_id}", flush=True)
    experiment = spec.tracking.experiment if spec.tracking.enabled else None
    if args.follow:
        status = cluster.follow(job_id)
        run = find_run(cluster.logs(job_id))
    elif args.no_wait:
        status, run = str(cluster.info(job_id).status), None
    else:
        status, run = wait_for_run(cluster, job_id, args.wait_timeout)
    print(f"  job         : {job_id} ({status})")
    if experiment:
        lines = describe_run(run, experiment)
        print("\n".join(lines))
    print(f"  follow      : gentrain logs {job_id} --follow{_address_flag(args)}")
    if status == "FAILED" or (args.follow and status != "SUCCEEDED"):
        message = cluster.info(job_id).message or ""
        print(f"error: job {job_id} ended {status}: {message.strip()[-2000:]}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gentrain.launch.remote import describe_run, find_run

    cluster = _cluster(args)
    info = cluster.info(args.job)
    metadata = info.metadata or {}
    print(f"  job         : {args.job} ({info.status})")
    if metadata.get("gentrain.spec"):
        print(f"  spec        : {metadata['gentrain.spec']} ({metadata.get('gentrain.job_type', '?')})")
    print(f"  entrypoint  : {info.entrypoint}")
    for label, stamp in (("started", info.start_time), ("ended", info.end_time)):
        if stamp:
            print(f"  {label:<12}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stamp / 1000))}")
    if info.message:
        print(f"  message     : {info.message.strip()[-2000:]}")
    if metadata.get("gentrain.experiment"):
        print("\n".join(describe_run(find_run(cluster.logs(args.job)), metadata["gentrain.experiment"])))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if args.follow:
        status = cluster.follow(args.job)
        print(f"[gentrain] job {args.job} ended {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    print(cluster.logs(args.job), end="")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from gentrain.launch.remote import TERMINAL, ClusterError

    cluster = _cluster(args)
    status = str(cluster.info(args.job).status)
    if status in TERMINAL:
        print(f"[gentrain] job {args.job} already ended {status}")
        return 0
    cluster.call(cluster.client.stop_job, args.job)
    status = cluster.wait(args.job, TERMINAL, args.timeout)
    if status not in TERMINAL:
        raise ClusterError(f"job {args.job} is still {status} {args.timeout:.0f} s after the stop request; "
                           f"check `gentrain status {args.job}`, or wait longer with --timeout")
    print(f"[gentrain] job {args.job} {status}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from gentrain.launch.remote import format_jobs

    cluster = _cluster(args)
    print(format_jobs(cluster.call(cluster.client.list_jobs)))
    return 0
