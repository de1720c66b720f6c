"""`gentrain bench e2e`'s reading of the timeline marks (the runs themselves are too slow
for the suite: `gentrain bench e2e --rounds 1 --steps 60` is the manual smoke run)."""

from __future__ import annotations

import pytest

from gentrain.bench import e2e
from gentrain.timeline import TIMELINE_ENV, mark, read


def test_marks_append_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.delenv(TIMELINE_ENV, raising=False)
    mark("nothing")
    assert not path.exists()
    monkeypatch.setenv(TIMELINE_ENV, str(path))
    mark("first_step", step=1)
    mark("step", step=25)
    assert [(m["event"], m.get("step")) for m in read(str(path))] == [("first_step", 1), ("step", 25)]


def _marks(started):
    return [{"event": "cli_start", "time": started + 2.0}, {"event": "ray_started", "time": started + 12.0},
            {"event": "worker_start", "time": started + 20.0}, {"event": "first_step", "time": started + 21.5},
            {"event": "step", "step": 25, "time": started + 22.0, "cpu": 10.0},
            {"event": "step", "step": 50, "time": started + 22.5, "cpu": 10.5},
            {"event": "step", "step": 75, "time": started + 24.0, "cpu": 11.0}]


def test_steady_rate_phases_and_first_step_from_marks():
    started = 1000.0
    marks = _marks(started)
    assert e2e._steady(marks) == pytest.approx(50 / 2.0)  # steps 25 -> 75 in 2 s
    assert e2e._steady(marks, "cpu") == pytest.approx(50 / 1.0)  # and 1 CPU second
    assert e2e._first(marks, "first_step", started) == pytest.approx(21.5)
    phases = e2e._phases(marks, started)
    assert phases == pytest.approx({"cli_start": 2.0, "ray_started": 10.0, "worker_start": 8.0, "first_step": 1.5})
    assert e2e._steady(marks[:5]) is None  # one progress step: no span


def test_rows_are_per_round_speed_ratios():
    def record(rate, wall, first):
        return {"steady_steps_per_s": rate, "wall_s": wall, "first_step_s": first, "phases": {},
                "load_before": 1.0, "load_after": 2.0}

    runs = {"baseline": [record(100.0, 30.0, 20.0), record(50.0, 60.0, 20.0)],
            "gentrain_plain": [record(90.0, 40.0, 25.0), record(50.0, 60.0, 20.0)],
            "gentrain_spec": [record(80.0, 45.0, 25.0), record(25.0, 60.0, 40.0)]}
    rows = {row["measure"]: row for row in e2e._rows(runs)}
    assert rows["steady steps/s, no eval/ckpt"]["ratios"] == pytest.approx([0.9, 1.0])
    assert rows["steady steps/s, debug spec's eval/ckpt"]["ratio"] == pytest.approx((0.8 + 0.5) / 2)
    assert rows["whole run wall s (debug spec)"]["ratios"] == pytest.approx([30 / 45, 1.0])
    assert rows["time to first step s"]["ratios"] == pytest.approx([0.8, 0.5])
    table = e2e.format_table({"rows": e2e._rows(runs), "breakdown": [], "machine": {"cpu_count": 2},
                              "settings": {"rounds": 2, "steps": 75, "workers": 2, "batch_size": 32}})
    assert "0.95x" in table and "1.00 to 2.00" in table
