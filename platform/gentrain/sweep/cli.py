"""The `gentrain sweep` command (see gentrain.sweep.run).

    gentrain sweep vae/debug train.steps=200 --param train.optimizer.lr=loguniform(1e-4,1e-2) \
        --param job.config.beta=choice(0.5,1,4) --samples 16 --metric eval/elbo --mode max
"""

from __future__ import annotations

import shlex
import sys


def add_sweep_command(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="a hyperparameter sweep of a spec: Ray Tune trials, ASHA, MLflow parent/child runs")
    sweep.add_argument("spec", help="a bundled spec (vae/debug) or a YAML file")
    sweep.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override spec fields for every trial, e.g. train.steps=200")
    sweep.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=DIST",
                       help="a swept spec field: loguniform(a,b), uniform(a,b), randint(a,b) (a..b "
                            "inclusive), choice(v1,v2,...), grid(v1,v2,...); repeatable")
    sweep.add_argument("--samples", type=int, default=1,
                       help="trials drawn from the space (default 1); with grid() params, each grid "
                            "point is run this many times")
    sweep.add_argument("--metric", required=True,
                       help="what ranks trials, as reported at evaluations: eval/<name> of the job "
                            "type or train/loss")
    sweep.add_argument("--mode", required=True, choices=("min", "max"), help="lower or higher is better")
    sweep.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                       help="asha (default): stop the worse trials at evaluations; fifo: run all to the end")
    sweep.add_argument("--reduction-factor", type=float, default=2.0,
                       help="ASHA: keep the best 1/F of the trials at each rung (default 2)")
    sweep.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default: as many as the cluster's resources hold)")
    sweep.add_argument("--name", default=None,
                       help="the sweep's name: its folder <storage_path>/<name> and parent MLflow run "
                            "(default: <spec name>-sweep)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep of this --name (same spec and params)")
    cluster = sweep.add_argument_group(
        "on a cluster", "--address submits the sweep as one Ray job (its driver runs `gentrain sweep` on the "
        "cluster, trials spread over its nodes); options as for `gentrain submit`")
    cluster.add_argument("--address", default=None,
                         help="the Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: run here)")
    mode = cluster.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", action="store_true", help="return once submitted")
    mode.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    cluster.add_argument("--working-dir", default=".", help="folder uploaded as the job's working folder")
    cluster.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                         help="leave matching files/folders out of the upload (repeatable)")
    cluster.add_argument("--no-credentials", action="store_true",
                         help="do not forward MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN to the job")
    cluster.add_argument("--job-id", default=None, help="the submission id (default: gentrain-<name>-<random>)")
    sweep.set_defaults(handler=cmd_sweep)


def sweep_arguments(args) -> list[str]:
    """The sweep's options as `gentrain sweep` takes them (the job's entrypoint on a cluster)."""
    argv = []
    for param in args.params:
        argv += ["--param", param]
    argv += ["--samples", str(args.samples), "--metric", args.metric, "--mode", args.mode,
             "--scheduler", args.scheduler, "--reduction-factor", f"{args.reduction_factor:g}"]
    if args.max_concurrent is not None:
        argv += ["--max-concurrent", str(args.max_concurrent)]
    if args.name:
        argv += ["--name", args.name]
    if args.resume:
        argv.append("--resume")
    return argv


def cmd_submit_sweep(args, request) -> int:
    """Check the spec and every param value here, then run `gentrain sweep` as a Ray job."""
    from gentrain.launch.remote import describe_run, find_run, submit, wait_for_run
    from gentrain.launch.remote_cli import _address_flag
    from gentrain.sweep.run import check_space, request_problems
    from gentrain.sweep.space import parse_params
    from gentrain.validation import validate

    problems = request_problems(request)
    if problems:
        raise ValueError("\n".join(problems))
    space = parse_params(request.params)
    # the cluster's machine checks (storage, weights) are the job's own, as for `submit`
    cluster, job_id, spec = submit(args.spec, args.overrides, args.address, args.working_dir, args.exclude,
                                   not args.no_credentials, args.job_id,
                                   command=["sweep", *sweep_arguments(args)],
                                   check=lambda resolved: check_space(resolved, space, args.spec, validate))
    print(f"[gentrain] submitted the sweep of {spec.name} to {cluster.address} as job {job_id}", flush=True)
    if args.follow:
        status = cluster.follow(job_id)
        run = find_run(cluster.logs(job_id))
    elif args.no_wait:
        status, run = str(cluster.info(job_id).status), None
    else:
        status, run = wait_for_run(cluster, job_id, 300.0)
    print(f"  job         : {job_id} ({status})")
    if spec.tracking.enabled:
        print("\n".join(describe_run(run, spec.tracking.experiment)).replace("mlflow run  :", "parent run  :"))
    print(f"  follow      : gentrain logs {job_id} --follow{_address_flag(args)}")
    if status == "FAILED" or (args.follow and status != "SUCCEEDED"):
        message = cluster.info(job_id).message or ""
        print(f"error: job {job_id} ended {status}: {message.strip()[-2000:]}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    from gentrain.sweep.results import table
    from gentrain.sweep.run import SweepInterrupted, SweepRequest, run_sweep

    request = SweepRequest(spec=args.spec, overrides=args.overrides, params=args.params,
                           metric=args.metric, mode=args.mode, samples=args.samples,
                           scheduler=args.scheduler, max_concurrent=args.max_concurrent,
                           reduction_factor=args.reduction_factor, name=args.name, resume=args.resume)
    if args.address:
        return cmd_submit_sweep(args, request)
    try:
        summary = run_sweep(request)
    except SweepInterrupted as stopped:
        print(table(stopped.rows, list(stopped.rows[0].params) if stopped.rows else [], request.metric))
        again = " ".join(shlex.quote(arg) for arg in sys.argv[1:] if arg != "--resume")
        print(f"[gentrain] sweep interrupted with {stopped.unfinished} trial(s) unfinished; its state is "
              f"in {stopped.sweep_dir}. Continue it with:\n  gentrain {again} --resume", file=sys.stderr)
        return 130
    counts = {}
    for row in summary.rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    keys = list(summary.rows[0].params) if summary.rows else []
    print()
    print(f"[gentrain] sweep {summary.name} done in {summary.seconds:.0f} s: {len(summary.rows)} trials ("
          + ", ".join(f"{n} {status}" for status, n in counts.items()) + ")")
    print(table(summary.rows, keys, request.metric, limit=20))
    if len(summary.rows) > 20:
        print(f"... {len(summary.rows) - 20} more in {summary.files.get('results.csv', 'the parent run')}")
    if summary.best is not None:
        print(f"  best trial  : {summary.best.trial} ({request.metric} {summary.best.metric:.6g})")
    if summary.best_spec:
        print(f"  best spec   : {summary.best_spec}")
        print(f"  train it    : gentrain run {summary.best_spec}")
    elif summary.best is None:
        print("  no trial reported the metric: no best spec", file=sys.stderr)
    if summary.files.get("results.csv"):
        print(f"  results     : {summary.files['results.csv']}")
    if summary.parent_run_id:
        print(f"  mlflow run  : {summary.parent_run_id} (parent of the trials' runs)")
        if summary.parent_pointer:
            print(f"  view it     : {summary.parent_pointer}")
    return 0 if summary.best is not None else 1
