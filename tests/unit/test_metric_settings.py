"""IS splits and KID subsets: settable, checked against the sample count, named in the reports.

    .venv/bin/pytest tests/unit/test_metric_settings.py -q
"""

import math
from pathlib import Path

import numpy as np
import pytest

from gentrain.cli import main
from gentrain.evaluation.periodic import pack_summary, unpack_summary
from gentrain.evaluation.run import metric_values
from gentrain.metrics import compute_metrics, feature_statistics, inception_score_from_logits, kernel_inception_distance
from gentrain.metrics.reference import ReferenceStatistics
from gentrain.metrics.settings import CLI_NAMES, MetricSettings
from gentrain.metrics.summary import LOGGED_SETTINGS, FeatureSummary, summary_metrics
from gentrain.schema import SpecError
from gentrain.validation import load_spec


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_the_default_kid_subsets_are_smaller_than_the_sets_so_kid_std_means_something(n):
    rng = np.random.default_rng(n)
    real, fake = rng.normal(size=(n, 8)), rng.normal(size=(n, 8)) + 0.2
    result = kernel_inception_distance(real, fake, num_subsets=20)
    assert result.subset_size == n // 2 < n
    assert result.std > 1e-6 * abs(result.mean)  # subsets of all n gave ~1e-13, float noise
    big = rng.normal(size=(2400, 2))
    assert kernel_inception_distance(big, big[::-1], 2).subset_size == 1000  # torch-fidelity's size from n = 2000


def direct_inception_score(logits, splits):
    """exp(mean KL(p(y|x) || p(y))) per chunk [i N // k, (i + 1) N // k), written out loop by loop."""
    count, classes = logits.shape
    scores = []
    for split in range(splits):
        rows = logits[split * count // splits:(split + 1) * count // splits]
        probabilities = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in rows]
        marginal = [sum(p[c] for p in probabilities) / len(probabilities) for c in range(classes)]
        kl = [sum(p[c] * math.log(p[c] / marginal[c]) for c in range(classes)) for p in probabilities]
        scores.append(math.exp(sum(kl) / len(kl)))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_inception_score_with_k_splits_equals_the_direct_computation(splits):
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [-2.0, 1.0, 4.0], [1.0, 1.0, 1.0], [5.0, -1.0, 0.0],
                       [0.0, 0.0, 2.5], [-1.0, 2.0, 0.0], [3.0, 3.0, -3.0], [0.5, -0.5, 1.5], [2.0, -2.0, 0.0],
                       [-3.0, 0.0, 3.0], [1.0, 4.0, 1.0], [0.0, -1.0, -2.0], [2.5, 0.5, 1.0]])
    expected_mean, expected_std = direct_inception_score(logits, splits)
    score = inception_score_from_logits(logits, splits=splits)
    assert (score.mean, score.std, score.splits) == (pytest.approx(expected_mean, rel=1e-12),
                                                    pytest.approx(expected_std, rel=1e-9, abs=1e-12), splits)
    report = compute_metrics(None, np.zeros((14, 2)), logits=logits, metrics=["is"], extractor_name="x",
                             is_splits=splits)
    assert report["is"] == pytest.approx(expected_mean, rel=1e-12) and report["is_splits"] == splits
    # The mergeable summary (gentrain eval, periodic eval) with the same splits, in two parts and packed.
    parts = [FeatureSummary(14, (), 3, splits) for _ in range(2)]
    parts[0].add(np.zeros((5, 2)), logits[:5], 0)
    parts[1].add(np.zeros((9, 2)), logits[5:], 5)
    packed = sum(pack_summary(part, np.zeros(2), 2) for part in parts)
    merged = unpack_summary(packed, parts[0], np.zeros(2), 14, 2)
    assert merged.inception_score().mean == pytest.approx(expected_mean, rel=1e-10)
    assert merged.inception_score().splits == splits


def test_settings_that_make_a_metric_meaningless_are_errors_naming_the_field_or_option(capsys):
    with pytest.raises(ValueError, match=r"is_splits: 20 must be between 1 and the number of samples \(8\)"):
        FeatureSummary(8, (), 3, is_splits=20)
    with pytest.raises(ValueError, match="splits: 20"):
        compute_metrics(None, np.zeros((8, 2)), logits=np.zeros((8, 3)), metrics=["is"], extractor_name="x",
                        is_splits=20)
    problems = MetricSettings(is_splits=600, kid_subsets=1).problems(["kid", "is"], 500, CLI_NAMES)
    assert problems[0].startswith("--is-splits: 600 must be between 1 and --n (500)")
    assert problems[1].startswith("--kid-subsets: 1 must be at least 2")
    assert MetricSettings().problems(["fid", "kid", "is"], 50, CLI_NAMES) == []
    assert main(["eval", "no/such/run", "--n", "300", "--kid-subset-size", "300"]) == 2
    error = capsys.readouterr().err
    assert "--kid-subset-size: 300 must be at least 2 and below the smaller set's 300" in error
    assert "kid_std would mean nothing" in error and "min(1000, n // 2) = 150" in error


def test_spec_eval_settings_are_fields_checked_against_fid_samples():
    base = ["eval.metrics=[fid,kid,is]", "eval.extractor=classifier:runs/c", "eval.fid_samples=400"]
    spec = load_spec("vae/debug", base + ["eval.is_splits=4", "eval.kid_subsets=20", "eval.kid_subset_size=150"])
    assert MetricSettings.of_spec(spec.eval) == MetricSettings(4, 20, 150)
    assert load_spec("vae/debug", base).eval.kid_subset_size is None
    with pytest.raises(SpecError) as error:
        load_spec("vae/debug", base + ["eval.is_splits=401", "eval.kid_subset_size=400"])
    message = str(error.value)
    assert "is_splits: 401 must be between 1 and fid_samples (400)" in message
    assert "kid_subset_size: 400 must be at least 2 and below" in message
    with pytest.raises(SpecError, match=r"eval.kid_subsets: 1 must be >= 2"):
        load_spec("vae/debug", base + ["eval.kid_subsets=1"])


def test_reports_say_which_settings_were_used():
    rng = np.random.default_rng(3)
    features, logits = rng.normal(size=(300, 4)).astype(np.float32), rng.normal(size=(300, 5))
    fake = FeatureSummary(300, range(300), 5, is_splits=6)
    fake.add(features, logits, 0)
    mu, sigma = feature_statistics(features)
    reference = ReferenceStatistics(mu, sigma, rng.normal(size=(200, 4)), "x", "train", "sha256:x", 200, 200,
                                    Path("unused.npz"), from_cache=False)
    report = summary_metrics(reference, fake, ["kid", "is"], extractor_name="x",
                             settings=MetricSettings(is_splits=6, kid_subsets=7))
    assert report["settings"] == {"kid_subsets": 7, "kid_subset_size": 100, "is_splits": 6,
                                  "kid_subset_size_rule": "default: min(1000, n // 2)",
                                  "kid_num_real": 200, "kid_num_fake": 300}
    assert report["kid_std"] > 0
    logged = metric_values({"samples": {**report, "extractor_label": "inception"}})
    assert logged["eval/inception/kid_subset_size"] == 100.0 and "kid_subset_size" in LOGGED_SETTINGS
    chosen = summary_metrics(reference, fake, ["kid"], extractor_name="x", settings=MetricSettings(kid_subset_size=50))
    assert chosen["settings"]["kid_subset_size"] == 50 and chosen["settings"]["kid_subset_size_rule"] == "set"
