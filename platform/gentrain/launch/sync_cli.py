"""`gentrain sync`: send the MLflow records a run left unsent while its server was away.

    gentrain sync runs/vae-debug                  # a run folder (<storage_path>/<name>)
    gentrain sync vae/debug name=vae-debug        # or the spec and overrides it was run with

The spool is `<run dir>/mlflow-spool/<run id>/`: the records rank 0 could not send and the
final status the driver could not set (gentrain.tracking.ending). Sending removes them, so
a second sync has nothing to do. Exit 1 while the server is still unreachable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gentrain.tracking.spool import recorded_uri


def add_sync_command(commands) -> None:
    sync = commands.add_parser(
        "sync", help="send a run's MLflow records left unsent (the server was away) and its final status")
    sync.add_argument("run", metavar="RUN_DIR_OR_SPEC",
                      help="a run folder (<storage_path>/<name>) or the spec it was run with")
    sync.add_argument("overrides", nargs="*", metavar="key=value", help="the run's overrides (with a spec)")
    sync.set_defaults(handler=cmd_sync)


def cmd_sync(args) -> int:
    """Send a run's spooled MLflow records and set the final status its driver recorded."""
    from gentrain import tracking

    run_dir, spec_uri = _run_dir_and_uri(args.run, args.overrides)
    spool = tracking.spool_dir_for(run_dir)
    run_ids = tracking.spooled_runs(spool) if spool else []
    if not run_ids:
        print(f"[gentrain] nothing to send: no unsent MLflow records in {spool or run_dir}")
        return 0
    failed = 0
    for run_id in run_ids:
        uri = recorded_uri(Path(spool) / run_id) or spec_uri
        ending = tracking.sync_run(uri, run_id, spool)
        marked = f"; marked {ending.status}" if ending.status and ending.marked else ""
        if ending.marked:
            print(f"[gentrain] run {run_id}: sent {ending.sent} records to {uri}{marked}")
            continue
        failed += 1
        print(f"error: run {run_id}: MLflow at {uri} did not take the records ({ending.error}); "
              f"{ending.unsent} stay in {ending.folder}: run `gentrain sync {args.run}` again "
              "once it is reachable", file=sys.stderr)
    return 1 if failed else 0


def _run_dir_and_uri(ref: str, overrides: list[str]) -> tuple[str, str]:
    """A run folder (<storage_path>/<name>) or a spec: its folder and its tracking URI."""
    from gentrain.tracking import resolve_tracking_uri

    if Path(ref).is_dir() and not overrides:
        from gentrain.checkpoint import latest_checkpoint

        latest = latest_checkpoint(ref)
        spec_uri = ((latest[1].get("spec") or {}).get("tracking") or {}).get("uri") if latest else None
        return str(Path(ref).resolve()), resolve_tracking_uri(spec_uri)
    from gentrain.validation import load_spec

    spec = load_spec(ref, overrides)
    return spec.run_dir, resolve_tracking_uri(spec.tracking.uri)
