"""`gentrain bench features` for a moment: what it writes and prints (nothing here is timed).

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_bench_features.py -q
"""

import contextlib
import io
import json
import math

import pytest

from gentrain.bench.features import run_features_bench


def test_alternates_both_sides_and_writes_the_ratio_of_each_round(tmp_path):
    json_path = tmp_path / "bench-features.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = run_features_bench(images=2, batch_size=2, size=8, rounds=2, json_path=str(json_path))
    written = json.loads(json_path.read_text())
    assert written == returned and written["benchmark"] == "features"
    assert [(row["round"], row["side"]) for row in written["rows"]] == [
        (0, "gentrain"), (0, "plain"), (1, "plain"), (1, "gentrain")]
    for row in written["rows"]:
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"]) and math.isfinite(row["images_per_s"])
    for round_index, ratio in enumerate(written["ratio_per_round"]):
        rates = {row["side"]: row["images_per_s"] for row in written["rows"] if row["round"] == round_index}
        assert ratio == pytest.approx(rates["gentrain"] / rates["plain"])
    assert "gentrain / plain images/s:" in printed.getvalue()


def test_refuses_settings_it_cannot_measure():
    with pytest.raises(SystemExit, match="--images must be >= 2"):
        run_features_bench(images=1, json_path=None)
