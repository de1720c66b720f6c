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
    sweep.set_defaults(handler=cmd_sweep)


def cmd_sweep(args) -> int:
    from gentrain.sweep.run import SweepInterrupted, SweepRequest, run_sweep, table

    request = SweepRequest(spec=args.spec, overrides=args.overrides, params=args.params,
                           metric=args.metric, mode=args.mode, samples=args.samples,
                           scheduler=args.scheduler, max_concurrent=args.max_concurrent,
                           reduction_factor=args.reduction_factor, name=args.name, resume=args.resume)
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
