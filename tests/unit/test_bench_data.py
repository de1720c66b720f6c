"""The data benchmark, run end to end on a few hundred samples. Nothing here is timed:
the tests check what the benchmark reports and reads, never how fast it is.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_bench_data.py -q
"""

import contextlib
import io
import json
import math

import pytest
import torch

from gentrain.bench.data import FORMATS, build_shard_sets, plain_tar_batches, run_data_bench
from gentrain.data.pipeline import eval_batches


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    json_path = folder / "bench-data.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = run_data_bench(samples=300, json_path=str(json_path), workdir=str(folder / "shards"),
                                  loader_workers=(0,), batch_size=64)
    return {"returned": returned, "written": json.loads(json_path.read_text()), "printed": printed.getvalue()}


def positive_finite(number) -> bool:
    return isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number) and number > 0


def test_json_holds_machine_settings_and_one_row_per_configuration(bench):
    written = bench["written"]
    assert written == bench["returned"]
    assert written["command"] == "gentrain bench data --samples 300"
    assert written["timestamp"]
    machine = written["machine"]
    for key in ("cpu_count", "usable_cpus", "torch", "webdataset", "load_average_before", "load_average_after"):
        assert machine[key], key
    assert written["settings"]["repeats"] >= 1 and written["settings"]["statistic"] == "median"
    assert set(written["datasets"]) == set(FORMATS)
    assert [(row["format"], row["loader_workers"]) for row in written["rows"]] == [(fmt, 0) for fmt in FORMATS]


def test_every_reported_number_is_positive_and_finite(bench):
    written = bench["written"]
    settings = written["settings"]
    for key in ("samples", "batch_size", "measured_batches", "samples_timed", "warmup_batches", "repeats"):
        assert positive_finite(settings[key]), key
    for info in written["datasets"].values():
        assert all(positive_finite(info[key]) for key in ("samples", "shards", "bytes"))
    for row in written["rows"]:
        numbers = [row["baseline_samples_per_second"], *row["baseline_runs"]]
        assert len(row["baseline_runs"]) == settings["repeats"]
        if row["pipeline_samples_per_second"] is None:
            # A format the pipeline cannot decode is reported with its reason, not as a number.
            assert row["pipeline_error"] and row["ratio"] is None and row["pipeline_runs"] == []
        else:
            numbers += [row["pipeline_samples_per_second"], row["ratio"], *row["pipeline_runs"]]
            assert len(row["pipeline_runs"]) == settings["repeats"]
        if row["loader_workers"] == 0 and row["pipeline_samples_per_second"] is not None:
            numbers += [row["cpu_ratio"], *row["pipeline_cpu_runs"], *row["baseline_cpu_runs"]]
            assert len(row["pipeline_cpu_runs"]) == len(row["baseline_cpu_runs"]) == settings["repeats"]
        assert all(positive_finite(number) for number in numbers), row
    png_rows = [row for row in written["rows"] if row["format"] == "png"]
    assert all(row["pipeline_samples_per_second"] is not None for row in png_rows), "the pipeline reads PNG shards"
    for load in (*written["machine"]["load_average_before"], *written["machine"]["load_average_after"]):
        assert math.isfinite(load) and load >= 0


def test_printed_table_has_a_line_per_row(bench):
    lines = bench["printed"].splitlines()
    assert any("pipeline samples/s" in line and "baseline samples/s" in line and "ratio" in line for line in lines)
    for row in bench["written"]["rows"]:
        matching = [line.split() for line in lines if line.split()[:2] == [row["format"], str(row["loader_workers"])]]
        assert len(matching) == 1 and len(matching[0]) == 6, (row["format"], bench["printed"])


def test_both_shard_sets_hold_the_same_images_and_the_baseline_decodes_like_the_pipeline(tmp_path):
    indexes = build_shard_sets(tmp_path, 96, min_shards=3)
    png, npy = indexes["png"], indexes["npy"]
    assert len(png.shard_urls("train")) == 3
    from_png = next(plain_tar_batches(png.shard_urls("train"), "png", png.shape, 96))
    from_npy = next(plain_tar_batches(npy.shard_urls("train"), "npy", npy.shape, 96))
    assert from_png["image"].shape == (96, *png.shape) and from_png["image"].dtype == torch.float32
    assert torch.equal(from_png["image"], from_npy["image"]) and torch.equal(from_png["label"], from_npy["label"])
    # eval_batches reads shards in index order without shuffling, as the baseline does.
    piped = next(eval_batches(png, "train", 96, rank=0, world_size=1))
    assert torch.equal(piped["image"], from_png["image"]) and torch.equal(piped["label"], from_png["label"])


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="samples"):
        run_data_bench(samples=0, json_path=None)
    with pytest.raises(ValueError, match="loader_workers"):
        run_data_bench(samples=10, json_path=None, loader_workers=())
