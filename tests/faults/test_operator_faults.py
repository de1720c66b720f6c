"""What an operator does to a running `gentrain run`, done from outside the process: SIGKILL
of Ray Train workers several times in one run (once in the middle of a checkpoint save),
SIGKILL of the driver and its embedded Ray mid-save and the same command again, a worker
killed with no restart left, a storage disk that fills up mid-run, and one that is
read-only.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/faults/test_operator_faults.py -q
    GENTRAIN_FAULT_SEED=7 ...      # other victims and driver-kill steps (default 13; printed)

Every run uses runs.SETTINGS (vae/debug, two Ray workers, fp32, 12 steps, a checkpoint
every 2) with a real MLflow server, and ends with the weights of conftest.py's
uninterrupted `reference` run, bit for bit. Asserted as README "What gentrain guarantees"
says: one MLflow run, FINISHED (or FAILED where the run fails), nothing left RUNNING, no
(metric, step) point twice, every metric's steps strictly increasing, every train/loss
step after the last restore present, a folder cut short never used (and named), no
traceback where an error message is due.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from gentrain.checkpoint import checkpoint_problem, step_dir_name
from processes import train_workers
from runs import (NAME, RESUMED, STEPS, Gentrain, assert_clean_record, assert_same_weights, command,
                  gentrain_run, runs_of)

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("GENTRAIN_FAULT_SEED", "13"))
PROGRESS = re.compile(r"\[gentrain\] step (\d+)/")
DIED = re.compile(r"\[gentrain\] worker (\d+) \(pid (\d+)\) died .*?; restarting the workers from the "
                  r"newest good checkpoint \(failure (\d+) of (\d+) allowed by checkpoint.max_failures\)")


def tracked(uri: str, experiment: str) -> list[str]:
    return ["tracking.enabled=true", f"tracking.uri={uri}", f"tracking.experiment={experiment}",
            "train.log_every=1"]


def next_new_checkpoint(run_dir: Path, after: int) -> Path:
    """The first step-N folder after step `after` that does not exist yet."""
    step = after + 1
    while step % 2 or (run_dir / step_dir_name(step)).exists():
        step += 1
    assert step <= STEPS, f"no checkpoint left to interrupt after step {after}"
    return run_dir / step_dir_name(step)


def the_two_workers(run: Gentrain) -> list[psutil.Process]:
    """The run's two Ray Train workers, once the previous attempt's are gone (Ray ends the
    survivor of a kill asynchronously, so for a moment after a restart there can be three)."""
    deadline = time.monotonic() + 60
    while len(workers := [w for w in train_workers(run.process.pid) if w.is_running()]) != 2:
        assert run.process.poll() is None, run.output()[-6000:]
        assert time.monotonic() < deadline, workers
        time.sleep(0.01)
    return workers


def wait_until_complete(folder: Path, run: Gentrain) -> None:
    deadline = time.monotonic() + 240
    while not folder.exists() or checkpoint_problem(folder) is not None:
        assert run.process.poll() is None, run.output()[-6000:]
        assert time.monotonic() < deadline, f"{folder} never became complete"
        time.sleep(0.002)


def kill_when_created(folder: Path, victims: list[int], run: Gentrain, also_group: bool = False) -> float:
    """SIGKILL `victims` (and the run's process group) the moment `folder` appears, i.e.
    while Ray Train is copying a rank's files into it (a few milliseconds); seconds from
    seeing it to the kill. The wait runs at real-time priority where allowed (root), so a
    loaded machine does not make it miss that window."""
    deadline = time.monotonic() + 240
    with realtime_priority():
        while not folder.exists():
            assert run.process.poll() is None, run.output()[-6000:]
            assert time.monotonic() < deadline, f"{folder} never appeared"
            time.sleep(0.0002)
        seen = time.monotonic()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):  # a worker of the previous attempt, gone
                os.kill(pid, signal.SIGKILL)
        for worker in train_workers(run.process.pid):  # and any worker the list did not have yet
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        if also_group:
            os.killpg(run.process.pid, signal.SIGKILL)
        return time.monotonic() - seen


@contextlib.contextmanager
def realtime_priority():
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        yield  # not permitted: ordinary priority (the kill may then land after the copy)
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, before[0], before[1])


def raylet_notice_in_ray_logs(pid: int, since: float) -> bool:
    """Ray keeps its raw worker-death notice in the session's event log."""
    root = Path(tempfile.gettempdir()) / "ray"
    for events in root.glob("session_*/logs/events/event_RAYLET.log"):
        if events.stat().st_mtime >= since and f"Worker PID: {pid}" in events.read_text(errors="replace"):
            return True
    return False


def test_three_worker_kills_in_one_run(restartable_mlflow, reference, tmp_path):
    """A seeded worker SIGKILLed as each of the next two checkpoints completes, then every worker SIGKILLed while step-N is
    being written: four attempts in one run, one MLflow run, the uninterrupted weights."""
    rng, started = random.Random(SEED), time.time()
    storage, uri = tmp_path / "runs", restartable_mlflow.uri
    run_dir = storage / NAME
    run = Gentrain.run(storage, *tracked(uri, "worker-kills"), "checkpoint.max_failures=4")
    run_id = run.wait_for(r"\[gentrain\] mlflow run: (\w+)")[1][1]
    killed, cut_short, resumed_at = [], [], 0
    position = 0
    for attempt in range(2):  # a seeded worker, the moment the next checkpoint is complete on disk
        # (watched on disk, not in the log: the log's step lines reach the driver late enough on a
        # loaded machine that the run could be near its end before a kill based on them)
        wait_until_complete(next_new_checkpoint(run_dir, resumed_at), run)
        workers = the_two_workers(run)
        victim = rng.choice(workers).pid
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        position, found = run.wait_for(RESUMED, start=position)
        resumed_at = int(found[1])
    # The third kill: every worker, the moment the next new step-N folder appears (Ray Train
    # copies the ranks' files into it for a few milliseconds). A kill that lands after the
    # copy is complete is retried once at the next folder (checkpoint.max_failures=4).
    for _ in range(2):
        workers = [worker.pid for worker in the_two_workers(run)]
        folder = next_new_checkpoint(run_dir, resumed_at)
        lag = kill_when_created(folder, workers, run)
        killed.extend(workers)
        position, found = run.wait_for(RESUMED, start=position)
        resumed_at = int(found[1])
        if checkpoint_problem(folder) is not None:
            cut_short.append(folder)
            break
        print(f"{folder.name} was complete {lag * 1000:.1f} ms after it appeared: kill again")
    returncode, _ = run.finish()
    output = run.output()
    print(f"seed {SEED}: killed {killed}; cut short {cut_short}")
    print("\n".join(line for _, line in run.lines if "died" in line or "not using" in line or "resumed" in line))
    assert returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    assert cut_short, f"no kill landed inside a checkpoint copy:\n{output[-4000:]}"

    # One gentrain line per failure instead of Ray's raw notice (kept in Ray's logs).
    assert "A worker died or was killed" not in output, output[-6000:]
    assert "View run" not in output  # MLflow's own link printing; the summary has "view it"
    deaths = DIED.findall(output)
    assert [int(failure) for _, _, failure, _ in deaths] == list(range(1, len(deaths) + 1)), deaths
    assert {limit for *_, limit in deaths} == {"4"}
    assert {int(pid) for _, pid, _, _ in deaths[:2]} == set(killed[:2]), (deaths, killed)
    assert raylet_notice_in_ray_logs(killed[0], since=started)
    # The restart inside the run names the folder cut short and does not use it.
    assert re.search(rf"\[gentrain\] not using {cut_short[0].name}: .*; falling back to step-", output), output[-6000:]
    restores = [(int(step), Path(folder)) for step, folder in RESUMED.findall(output)]
    assert len(restores) == len(deaths)
    assert all(folder == run_dir / step_dir_name(step) and folder != cut_short[0] for step, folder in restores)

    runs = runs_of(uri, "worker-kills")
    assert [(run.info.run_id, run.info.status) for run in runs] == [(run_id, "FINISHED")]
    assert_clean_record(uri, run_id, after=restores[-1][0])
    assert_same_weights(reference, run_dir)


def test_driver_and_its_ray_killed_mid_save_then_the_same_command(restartable_mlflow, reference, tmp_path):
    """SIGKILL of the whole `gentrain run` (its process group: the driver, Ray's GCS and
    raylet; and the Ray Train workers, which Ray puts in process groups of their own) while
    step-N is being written; then the same command. A kill that lands after the copy is
    complete is repeated once on the rerun's next folder."""
    rng = random.Random(SEED + 1)
    storage, uri = tmp_path / "runs", restartable_mlflow.uri
    run_dir = storage / NAME
    extra = tracked(uri, "driver-kill")
    run_id, folder, problem = None, None, None
    for attempt in range(2):
        run = Gentrain.run(storage, *extra, start_new_session=True)
        run_id = run_id or run.wait_for(r"\[gentrain\] mlflow run: (\w+)")[1][1]
        if attempt == 0:
            _, found = run.wait_for(rf"\[gentrain\] step ({rng.randint(2, 6)})/")
        else:
            assert run.wait_for(r"\[gentrain\] mlflow run: (\w+)")[1][1] == run_id
            _, found = run.wait_for(RESUMED)
        everything = psutil.Process(run.process.pid).children(recursive=True)
        workers = [worker.pid for worker in train_workers(run.process.pid)]
        session = next((re.search(r"(/\S*/session_[^/\s]+)", " ".join(p.cmdline())) for p in everything
                        if "raylet" in p.name()), None)
        folder = next_new_checkpoint(run_dir, int(found[1]))
        lag = kill_when_created(folder, workers, run, also_group=True)
        run.finish()
        killed_at = time.monotonic()
        gone, alive = psutil.wait_procs(everything, timeout=60)
        print(f"killed {lag * 1000:.2f} ms after {folder.name} appeared; {len(gone)} processes of the "
              f"killed run gone after {time.monotonic() - killed_at:.1f} s; Ray session {session and session[1]}")
        assert not alive, [(p.pid, p.name(), p.cmdline()) for p in alive]
        assert "Traceback" not in run.output(), run.output()[-6000:]
        assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "RUNNING"  # nobody could end it
        problem = checkpoint_problem(folder)
        if problem is not None:
            break
        print(f"{folder.name} was complete {lag * 1000:.2f} ms after it appeared: kill the rerun too")
    assert problem is not None, "no kill landed inside a checkpoint copy"

    rerun = gentrain_run(storage, *extra)
    out = rerun.stdout
    assert f"[gentrain] not using {folder.name}: {problem}; falling back to step-" in out, out
    continuing = re.search(rf"\[gentrain\] continuing {NAME} from step (\d+) \((.*?)\) in MLflow run (\w+)", out)
    assert continuing, out
    step = int(continuing[1])
    assert Path(continuing[2]) == run_dir / step_dir_name(step) != folder and continuing[3] == run_id
    assert f"[gentrain] resumed from step {step} ({run_dir / step_dir_name(step)})" in out, out
    runs = runs_of(uri, "driver-kill")
    assert [(run.info.run_id, run.info.status) for run in runs] == [(run_id, "FINISHED")]
    assert_clean_record(uri, run_id, after=step)
    assert_same_weights(reference, run_dir)


def test_a_worker_death_with_no_restart_left_is_one_paragraph(restartable_mlflow, tmp_path):
    """checkpoint.max_failures=0 (the default) and a worker SIGKILLed after step-2: exit 1
    with one paragraph naming the worker and where the same command continues, no
    traceback, the MLflow run FAILED."""
    storage, uri = tmp_path / "runs", restartable_mlflow.uri
    run = Gentrain.run(storage, *tracked(uri, "no-restart"))
    run_id = run.wait_for(r"\[gentrain\] mlflow run: (\w+)")[1][1]
    run.wait_for(r"\[gentrain\] step 3/")
    victim = random.Random(SEED).choice(train_workers(run.process.pid)).pid
    os.kill(victim, signal.SIGKILL)
    returncode, _ = run.finish()
    output = run.output()
    print(output[-1500:])
    assert returncode == 1, output[-6000:]
    assert "Traceback" not in output and "A worker died or was killed" not in output, output[-6000:]
    assert "[gentrain] worker" not in output and "not restarted" not in output, output[-6000:]
    error = next(line for line in output.splitlines() if line.startswith("error: "))
    good = re.search(rf"error: training {NAME} failed: worker \d \(pid {victim}\) died \(.*\), no restarts "
                     r"allowed \(checkpoint.max_failures=0\)\. Run the same command to continue from step "
                     r"(\d+) \((.*?)\); raise checkpoint.max_failures", error)
    assert good and int(good[1]) >= 2 and checkpoint_problem(Path(good[2])) is None, error
    assert output.splitlines()[-1] == error  # the last line: nothing after it
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (three checkpoints of vae/debug fit, the fourth does not); unmounted
    after the test whatever happens."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def remount(mount_point: Path, options: str) -> None:
    for _ in range(50):  # "busy" while a file there is open for writing
        if subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)]).returncode == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"could not remount {mount_point} {options}")


def test_full_then_read_only_storage(small_disk, restartable_mlflow, reference, tmp_path):
    """storage_path on a disk that fills up mid-run: one paragraph naming it, the run FAILED,
    a folder cut short by the full disk never used; with room again the same command
    continues from the newest good checkpoint. Then the disk read-only in the middle of a
    run that trains on (one paragraph, FAILED), and before a start (refused before anything
    starts)."""
    storage, uri = small_disk / "runs", restartable_mlflow.uri
    run_dir = storage / NAME
    extra = tracked(uri, "full-disk")
    full = subprocess.run(**command(storage, *extra), capture_output=True, timeout=300)
    error = full.stderr
    print(error)
    assert full.returncode == 1, full.stdout[-3000:] + error[-3000:]
    assert "Traceback" not in full.stdout + error, error[-6000:]
    paragraph = next(line for line in error.splitlines() if line.startswith("error: "))
    assert f"storage_path {storage}: no space left on device" in paragraph, error
    assert "To fix: free space there or set storage_path to a larger disk, then run the same command" in paragraph
    good = re.search(r"continue from step (\d+) \((.*?)\)", paragraph)
    assert good and checkpoint_problem(Path(good[2])) is None, paragraph
    assert len(error.strip().splitlines()) <= 3, error  # the paragraph and where Ray's logs are
    run_id = re.search(r"\[gentrain\] mlflow run: (\w+)", full.stdout)[1]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"
    cut_short = [folder for folder in sorted(run_dir.glob("step-*")) if checkpoint_problem(folder)]
    print(f"after the full disk: {[f.name for f in run_dir.glob('step-*')]}, cut short: {cut_short}")

    remount(small_disk, "size=64m")
    rerun = gentrain_run(storage, *extra)
    out = rerun.stdout
    for folder in cut_short:
        assert f"[gentrain] not using {folder.name}: " in out, out
    assert f"[gentrain] continuing {NAME} from step {good[1]} ({good[2]}) in MLflow run {run_id}" in out, out
    runs = runs_of(uri, "full-disk")
    assert [(run.info.run_id, run.info.status) for run in runs] == [(run_id, "FINISHED")]
    assert_clean_record(uri, run_id, after=int(good[1]))
    assert_same_weights(reference, run_dir)

    # Read-only mid-run: the run trained on from step 12 (to 24) loses its storage.
    more = Gentrain.run(storage, *extra, f"train.steps={2 * STEPS}")
    more.wait_for(rf"\[gentrain\] resumed from step {STEPS} ")
    remount(small_disk, "ro")
    returncode, _ = more.finish()
    output = more.output()
    print(output[-2000:])
    assert returncode == 1, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    paragraph = next(line for line in output.splitlines() if line.startswith("error: "))
    assert f"storage_path {storage}: read-only file system" in paragraph, paragraph
    assert "To fix: remount it read-write or set storage_path to a writable folder, then run the same command" in paragraph
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"  # not RUNNING

    # Read-only before the start: refused before Ray and MLflow start.
    more = subprocess.run(**command(storage, *extra, f"train.steps={4 * STEPS}"),
                          capture_output=True, timeout=120)
    assert more.returncode != 0, more.stdout[-3000:]
    assert "Traceback" not in more.stdout + more.stderr, more.stderr[-6000:]
    # Refused when the spec is checked (gentrain.spec_checks), before Ray and MLflow start.
    assert f"storage_path: cannot create or write '{storage}': Read-only file system" in more.stderr, more.stderr
    assert more.stderr.startswith("error: ") and len(more.stderr.strip().splitlines()) == 2, more.stderr
    runs = runs_of(uri, "full-disk")
    assert [(run.info.run_id, run.info.status) for run in runs] == [(run_id, "FAILED")]  # untouched
