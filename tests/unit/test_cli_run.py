"""The `gentrain` command line without Ray: argument order, and the decisions `gentrain run`
takes from the latest checkpoint before it starts Ray or touches MLflow.

    .venv/bin/pytest tests/unit/test_cli_run.py -q
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from gentrain.checkpoint import MODEL_FILE, file_manifest, step_dir_name, write_meta
from gentrain.cli import build_parser, main
from gentrain.launch.console import WorkerConsole
from gentrain.launch.local import continuing_message, spec_changes
from gentrain.validation import load_spec


@pytest.mark.parametrize("argv", [
    ["submit", "vae/debug", "--address", "http://HEAD:8265", "name=x", "train.steps=3"],
    ["submit", "vae/debug", "name=x", "--address", "http://HEAD:8265", "--no-wait", "train.steps=3"],
    ["submit", "--address", "http://HEAD:8265", "vae/debug", "name=x", "train.steps=3"],
    ["run", "vae/debug", "name=x", "train.steps=3"],
    ["validate", "vae/debug", "name=x", "--print", "train.steps=3"],
])
def test_options_and_overrides_parse_in_any_order(argv):
    args = build_parser().parse_args(argv)
    assert args.spec == "vae/debug"
    assert args.overrides == ["name=x", "train.steps=3"]
    if args.command == "submit":
        assert args.address == "http://HEAD:8265"


@pytest.mark.parametrize("argv", [
    ["sample", "runs/d", "--set", "sampler=ddim", "steps=50", "--out", "g.png"],  # the form
    ["sample", "runs/d", "--set", "sampler=ddim", "--set", "steps=50", "--out", "g.png"],
    ["sample", "--set", "sampler=ddim", "runs/d", "--out", "g.png", "--set", "steps=50"],
    ["sample", "runs/d", "--out", "g.png", "--set", "sampler=ddim", "steps=50"],
])
def test_sampler_settings_may_follow_one_set_or_each_their_own(argv):
    args = build_parser().parse_args(argv)
    assert (args.ref, args.out, args.sampling) == ("runs/d", "g.png", ["sampler=ddim", "steps=50"])


def test_an_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["run", "vae/debug", "name=x", "--nosuch"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --nosuch" in capsys.readouterr().err


def test_validate_with_an_option_between_overrides(capsys):
    assert main(["validate", "vae/debug", "train.steps=70", "--print", "name=mixed"]) == 0
    out = capsys.readouterr().out
    assert "name: mixed" in out and "70 steps" in out


def test_submit_options_after_overrides_reach_the_command(capsys):
    # A spec that does not exist fails before anything is sent to the (unreachable) address.
    code = main(["submit", "no/such-spec", "--address", "http://127.0.0.1:9", "name=x", "--no-wait"])
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized arguments" not in err and "no/such-spec" in err


def fake_checkpoint(storage, step: int, spec_changes_: dict | None = None) -> str:
    spec = load_spec("vae/debug", [f"storage_path={storage}", "train.steps=40"]).to_dict()
    for path, value in (spec_changes_ or {}).items():
        section, key = path.split(".")
        spec[section][key] = value
    folder = storage / "vae-debug" / step_dir_name(step)
    folder.mkdir(parents=True)
    torch.save({"networks": {}, "ema": {}}, folder / MODEL_FILE)  # a verified folder: files listed
    write_meta(str(folder), {"step": step, "batches_consumed": 0, "mlflow_run_id": "abc123",
                             "spec": spec, "files": file_manifest(folder)})
    return str(folder)


def test_a_finished_run_is_done_before_ray_or_mlflow_start(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    folder = fake_checkpoint(tmp_path / "runs", 40)
    started = time.perf_counter()
    code = main(["run", "vae/debug", f"storage_path={tmp_path / 'runs'}", "train.steps=40"])
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    assert code == 0
    assert "already trained 40 of 40 steps; nothing to do" in out and folder in out
    assert "done:" not in out
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()  # the MLflow run was not touched
    assert elapsed < 10, elapsed


def test_fewer_steps_than_the_checkpoint_says_pick_a_new_name(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    fake_checkpoint(tmp_path / "runs", 40, {"train.steps": 40})
    code = main(["run", "vae/debug", f"storage_path={tmp_path / 'runs'}", "train.steps=30",
                 "train.log_every=5"])
    out = capsys.readouterr().out
    assert code == 0 and not ray.is_initialized()
    assert "already trained to step 40" in out and "train.steps=30" in out
    assert "pick a new `name` (e.g. name=vae-debug-30)" in out
    assert "not applied" in out and "train.log_every 25 -> 5" in out


def test_continuing_says_which_spec_fields_changed(tmp_path):
    fake_checkpoint(tmp_path / "runs", 40, {"train.steps": 40})
    spec = load_spec("vae/debug", [f"storage_path={tmp_path / 'runs'}", "train.steps=80"])
    folder = tmp_path / "runs" / "vae-debug" / step_dir_name(40)
    meta = json.loads((folder / "gentrain.json").read_text())
    message = continuing_message(spec, folder, meta)
    assert message.startswith("[gentrain] continuing vae-debug from step 40")
    assert "MLflow run abc123" in message
    assert "spec changed since that checkpoint: train.steps 40 -> 80" in message


def test_spec_changes_lists_nested_fields_and_caps_the_list():
    before = {"train": {"steps": 300, "lr": 0.1}, "name": "a", "extra": {"x": 1}}
    after = {"train": {"steps": 200, "lr": 0.1}, "name": "a", "new": "y" * 100}
    changes = spec_changes(before, after)
    assert changes[0] == "extra.x 1 -> (unset)"
    assert changes[1].startswith("new (unset) -> yyy") and changes[1].endswith("...")
    assert changes[2] == "train.steps 300 -> 200"
    assert spec_changes(None, after) == []
    assert spec_changes(before, after, limit=1)[-1] == "and 2 more"


def test_fields_added_since_a_checkpoint_was_written_are_not_changes():
    """A checkpoint of an older gentrain lacks the fields added since: they take their
    defaults, as the rerun's spec does, and only what the user changed is listed."""
    spec = load_spec("ebm/debug", ["tracking.enabled=false"])
    saved = spec.to_dict()
    del saved["job"]["config"]["leapfrog_steps"], saved["eval"]["sampler_rates"]
    assert spec_changes(saved, spec.to_dict()) == []
    changed = load_spec("ebm/debug", ["tracking.enabled=false", "job.config.leapfrog_steps=7"])
    assert spec_changes(saved, changed.to_dict()) == ["job.config.leapfrog_steps 5 -> 7"]


def test_worker_console_shows_gentrain_lines_and_keeps_ray_chatter_for_a_failure():
    out, err = io.StringIO(), io.StringIO()
    console = WorkerConsole(out=out, err=err, redraw=False)
    console.handle({"pid": 7, "actor_name": "RayTrainWorker", "is_err": False, "lines": [
        "[gentrain] step 25/40 | loss 1.0", "Reporting training result 1: TrainingReport(...)",
        "[gentrain] step 40/40 | loss 0.5"]})
    console.handle({"pid": 8, "actor_name": "RayTrainWorker", "is_err": True,
                    "lines": ["[gentrain] warning: MLflow unreachable"]})
    assert out.getvalue() == "[gentrain] step 25/40 | loss 1.0\n[gentrain] step 40/40 | loss 0.5\n"
    assert err.getvalue() == "[gentrain] warning: MLflow unreachable\n"
    console.report_failure("/tmp/ray/session/logs")
    assert "(RayTrainWorker pid=7) Reporting training result 1" in err.getvalue()
    assert "Ray's logs (every worker and actor): /tmp/ray/session/logs" in err.getvalue()


def test_worker_console_redraws_progress_on_a_terminal():
    out = io.StringIO()
    console = WorkerConsole(out=out, err=out, redraw=True)
    console.handle({"pid": 7, "is_err": False, "lines": [
        "[gentrain] step 1/2 | loss 1.0", "[gentrain] step 2/2 | loss 0.5", "[gentrain] eval at step 2"]})
    assert out.getvalue() == ("\r\x1b[2K[gentrain] step 1/2 | loss 1.0\r\x1b[2K[gentrain] step 2/2 | loss 0.5"
                              "\n[gentrain] eval at step 2\n")


def test_worker_console_leaves_out_the_autoscaler_and_caps_the_failure_report():
    err = io.StringIO()
    console = WorkerConsole(out=io.StringIO(), err=err, redraw=False)
    console.handle({"pid": "autoscaler", "lines": ["======== Autoscaler status ========"]})
    console.handle({"pid": 7, "actor_name": "TrainController", "lines": [f"line {i}" for i in range(50)]})
    console.report_failure(None, lines=3)
    assert err.getvalue() == ("Ray's last lines before the failure:\n  (TrainController pid=7) line 47\n"
                              "  (TrainController pid=7) line 48\n  (TrainController pid=7) line 49\n")
    console.report_failure("/logs", lines=0)
    assert err.getvalue().endswith("line 49\nRay's logs (every worker and actor): /logs\n")
