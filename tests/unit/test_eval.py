"""Evaluation logic: mergeable summaries, work units, packing for all-reduce, settings and errors.

    .venv/bin/pytest tests/unit/test_eval.py -q
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from gentrain.evaluation.extractors import check_extractor_choice, make_extractor
from gentrain.evaluation.periodic import pack_summary, unpack_summary
from gentrain.evaluation.run import parse_metrics
from gentrain.evaluation.work import data_units, generated_units, kept_rows, summarize_data
from gentrain.metrics import RunningStatistics, feature_statistics, inception_score_from_logits
from gentrain.metrics.reference import ReferenceStatistics
from gentrain.metrics.summary import FeatureSummary, summary_metrics
from gentrain.schema import SpecError
from gentrain.validation import load_spec


def stream(rows=600, dim=6, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(3.0, 1.0, (rows, dim)) @ rng.normal(size=(dim, dim))
    logits = rng.normal(size=(rows, classes)) * 3
    return features.astype(np.float32), logits


def summaries_of(features, logits, units, keep, worker_count):
    """Each worker summarises its units (round-robin), as distributed.py and periodic.py deal them."""
    total = features.shape[0]
    parts = []
    for worker in range(worker_count):
        summary = FeatureSummary(total, keep, logits.shape[1])
        for unit in units[worker::worker_count]:
            rows = slice(unit.start, unit.start + unit.rows)
            summary.add(features[rows], logits[rows], unit.start)
        parts.append(summary)
    return parts


@pytest.mark.parametrize("worker_count", [1, 3, 7])
def test_merged_summaries_equal_the_single_pass_statistics_whatever_the_split(worker_count):
    features, logits = stream()
    keep = kept_rows(len(features), shuffled=True, seed=1)[:50]
    parts = summaries_of(features, logits, generated_units(len(features), 64), keep, worker_count)
    merged = parts[-1]
    for part in parts[-2::-1]:  # merge order is not unit order
        merged.merge(part)
    mu, sigma = merged.statistics.statistics()
    expected_mu, expected_sigma = feature_statistics(features.astype(np.float64))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-10)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(merged.kept_features(), features[np.sort(keep)])
    score = merged.inception_score()
    expected = inception_score_from_logits(logits, splits=10)
    assert score.mean == pytest.approx(expected.mean, rel=1e-10)
    assert score.std == pytest.approx(expected.std, rel=1e-8)


def test_running_statistics_move_their_sums_to_another_centre_exactly():
    features, _ = stream(rows=100)
    statistics = RunningStatistics()
    statistics.update(features[:40])
    statistics.update(features[40:])
    centre = np.full(features.shape[1], -7.0)
    total, outer = statistics.sums_around(centre)
    shifted = features.astype(np.float64) - centre
    np.testing.assert_allclose(total, shifted.sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(outer, shifted.T @ shifted, rtol=1e-10)
    rebuilt = RunningStatistics.from_sums(statistics.count, centre, total, outer)
    for ours, theirs in zip(rebuilt.statistics(), statistics.statistics()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_packed_summaries_summed_like_an_all_reduce_give_the_merged_summary():
    features, logits = stream(rows=300, dim=4)
    keep = np.arange(40)
    parts = summaries_of(features, logits, generated_units(300, 32), keep, 3)
    raw = sum(np.concatenate([[p.count], p.statistics.raw_sum(4)]) for p in parts)
    centre = raw[1:] / raw[0]
    reduced = sum(pack_summary(part, centre, 4) for part in parts)  # what all_reduce(op="sum") computes
    gathered = unpack_summary(reduced, parts[0], centre, int(raw[0]), 4)
    np.testing.assert_allclose(gathered.statistics.statistics()[1], np.cov(features.astype(np.float64), rowvar=False),
                               rtol=1e-9)
    np.testing.assert_array_equal(gathered.kept_features(), features[:40])
    assert gathered.inception_score().mean == pytest.approx(inception_score_from_logits(logits).mean, rel=1e-10)


def test_units_cover_every_row_once_and_data_units_follow_the_shards(small):
    units = generated_units(1001, 250)
    assert [(u.start, u.rows) for u in units] == [(0, 250), (250, 250), (500, 250), (750, 250), (1000, 1)]
    counts = small.split("train").counts
    shards = data_units(small, "train", 50)
    assert sum(u.rows for u in shards) == 50 and shards[0] == (0, 0, counts[0])
    assert [u.start for u in shards] == list(np.cumsum([0] + [u.rows for u in shards[:-1]]))
    assert kept_rows(10, shuffled=True).tolist() == list(range(10))  # all rows: no sampling needed


def test_data_summaries_split_by_shard_equal_one_pass(small):
    extractor = _pixels_extractor()
    total = small.total("train")
    units = data_units(small, "train", total)
    whole = summarize_data(small, "train", extractor, units, total, batch_size=7)
    halves = summarize_data(small, "train", extractor, units[1::2], total, batch_size=64)
    halves.merge(summarize_data(small, "train", extractor, units[0::2], total, batch_size=5))
    assert whole.count == halves.count == total
    for ours, theirs in zip(whole.statistics.statistics(), halves.statistics.statistics()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(whole.kept_features(), halves.kept_features())


def test_summary_metrics_refuse_a_reference_of_another_extractor():
    features, logits = stream(rows=50, dim=3)
    fake = FeatureSummary(50, range(50), logits.shape[1])
    fake.add(features, logits, 0)

    mu, sigma = feature_statistics(features)
    reference = ReferenceStatistics(mu, sigma, features, "inception-v3-fid-2015-12-05", "train", "sha256:x", 50, 50,
                                    Path("unused.npz"), from_cache=False)
    report = summary_metrics(reference, fake, ["fid", "kid", "pr"], extractor_name="inception-v3-fid-2015-12-05")
    assert report["fid"] == pytest.approx(0.0, abs=1e-8) and report["precision"] == 1.0
    with pytest.raises(ValueError, match="never compared"):
        summary_metrics(reference, fake, ["fid"], extractor_name="classifier:x@step-1#ab")


def test_metric_names_and_extractor_names_are_checked():
    assert parse_metrics("fid, KID,nll,fid") == ["fid", "kid", "nll"]
    with pytest.raises(ValueError, match="unknown fdi; choose from fid, kid, is, pr, nll, heldout"):
        parse_metrics("fdi")
    assert check_extractor_choice("inception") is None
    assert check_extractor_choice("classifier:runs/c") is None
    assert "not an extractor" in check_extractor_choice("classifier:")
    with pytest.raises(ValueError, match="extractor: 'vgg'"):
        make_extractor("vgg")


def test_spec_eval_fields_are_validated_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("GENTRAIN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(SpecError) as error:
        load_spec("vae/debug", ["eval.metrics=[fid,fdi,precision]", "eval.extractor=vgg"])
    message = str(error.value)
    assert "'fdi', 'precision'; known: fid, kid, is, pr" in message and "eval.extractor: 'vgg'" in message
    with pytest.raises(SpecError) as error:  # inception without a weight file: a validate-time error
        load_spec("vae/debug", ["eval.metrics=[fid]", f"eval.inception_weights={tmp_path / 'none.pth'}"])
    assert "eval.inception_weights" in str(error.value) and "curl -L" in str(error.value)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert load_spec("vae/debug", ["eval.metrics=[fid]", f"eval.inception_weights={weights}"]).eval.metrics == ["fid"]
    assert load_spec("vae/debug", ["eval.metrics=[fid,kid]", "eval.extractor=classifier:runs/c"]).eval.fid_samples


def test_missing_inception_weights_name_the_spec_field_and_the_flag(monkeypatch):
    monkeypatch.delenv("GENTRAIN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        make_extractor("inception")
    assert "eval.inception_weights" in str(error.value) and "--inception-weights" in str(error.value)


def _pixels_extractor():
    from gentrain.metrics import ClassifierFeatures

    model = torch.nn.Flatten()
    return ClassifierFeatures(model, lambda m, images: m(images), name="pixels", dim=64)
