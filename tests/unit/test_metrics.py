"""The metrics against closed forms and direct implementations: FID, KID, IS, precision/recall, reference cache.

    PYTHONPATH=platform .venv/bin/python -m pytest tests/unit/test_metrics.py -q
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from gentrain.metrics import (ClassifierFeatures, compute_metrics, extract_features, feature_statistics,
                              fid_from_features, frechet_distance, frechet_distance_terms, inception_score,
                              inception_score_from_logits, kernel_inception_distance, load_or_compute_reference,
                              precision_recall, unbiased_mmd2)
from gentrain.metrics import frechet
from gentrain.metrics.frechet import RunningStatistics
from gentrain.metrics.precision_recall import knn_squared_radii
from gentrain.metrics.reference import default_cache_dir, reference_path


def closed_form_commuting(mu1, variances1, mu2, variances2):
    """FID of Gaussians whose covariances share eigenvectors: the square root acts eigenvalue by eigenvalue."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(variances1 + variances2 - 2 * np.sqrt(variances1 * variances2)))


# --- Frechet distance ---------------------------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(closed_form_commuting(mu1, a, mu2, b), abs=1e-6)


def test_frechet_distance_of_commuting_non_diagonal_covariances_equals_the_closed_form():
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a, b = rng.uniform(0.05, 4.0, 8), rng.uniform(0.05, 4.0, 8)
    sigma1, sigma2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert abs(sigma1 - np.diag(np.diag(sigma1))).max() > 0.1  # really not diagonal
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(closed_form_commuting(mu1, a, mu2, b), abs=1e-6)


def test_frechet_distance_of_non_commuting_2x2_covariances():
    # For a 2x2 matrix with positive eigenvalues, tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)).
    sigma1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    sigma2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    product = sigma1 @ sigma2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_handles_singular_covariances_exactly_without_an_offset():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    terms = frechet_distance_terms(mu1, np.diag(a), mu2, np.diag(b))
    assert terms.distance == pytest.approx(closed_form_commuting(mu1, a, mu2, b), abs=1e-9)
    assert terms.offset == 0.0
    assert terms.mean_term == pytest.approx(5.0)


def test_fid_of_fewer_samples_than_dimensions_is_finite_and_zero_for_identical_sets():
    rng = np.random.default_rng(2)
    few_a, few_b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5
    assert np.linalg.matrix_rank(feature_statistics(few_a)[1]) < 64
    distance = fid_from_features(few_a, few_b)
    assert np.isfinite(distance) and distance > 0
    assert abs(fid_from_features(few_a, few_a)) < 1e-8


def test_fid_is_about_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(size=(400, 32)) * 1.5 + 0.2
    assert abs(fid_from_features(a, a)) < 1e-8
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-10)
    assert fid_from_features(a, b) > 1.0


def test_frechet_distance_offset_is_used_and_reported_only_when_a_decomposition_fails(monkeypatch):
    calls = {"count": 0}
    real_eigh = np.linalg.eigh

    def failing_once(matrix):
        calls["count"] += 1
        if calls["count"] == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real_eigh(matrix)

    monkeypatch.setattr(frechet.np.linalg, "eigh", failing_once)
    a, b = np.array([1.0, 2.0]), np.array([3.0, 0.5])
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        terms = frechet_distance_terms(np.zeros(2), np.diag(a), np.ones(2), np.diag(b))
    assert terms.offset == 1e-6
    assert terms.distance == pytest.approx(closed_form_commuting(np.zeros(2), a, np.ones(2), b), abs=1e-5)


def test_frechet_distance_rejects_non_covariances_and_non_finite_features():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        fid_from_features(bad, np.ones((4, 3)))


def test_running_statistics_match_the_two_pass_ones():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(300, 5)) * 0.01 + 1000.0  # a large mean: a naive E[xx] - mu^2 would cancel
    running = RunningStatistics()
    for batch in np.array_split(features, 7):
        running.update(batch)
    mu, sigma = running.statistics()
    expected_mu, expected_sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-7, atol=1e-12)


# --- KID ------------------------------------------------------------------------------------------------------

def direct_unbiased_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, pair by pair."""
    m, d = len(x), x.shape[1]
    kernel = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    xx = sum(kernel(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd2_matches_a_direct_pairwise_implementation():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(25, 6)), rng.normal(size=(25, 6)) + 0.3
    assert unbiased_mmd2(x, y) == pytest.approx(direct_unbiased_mmd2(x, y), rel=1e-10, abs=1e-12)


def test_kid_over_subsets_matches_the_direct_estimator_on_each_subset():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) * 1.3
    result = kernel_inception_distance(real, fake, num_subsets=4, subset_size=12, seed=11)
    chooser = np.random.default_rng(11)  # the same draws, in the same order, as the implementation
    values = []
    for _ in range(4):
        rows_real, rows_fake = chooser.choice(40, 12, replace=False), chooser.choice(30, 12, replace=False)
        values.append(direct_unbiased_mmd2(real[rows_real], fake[rows_fake]))
    assert result.mean == pytest.approx(np.mean(values), rel=1e-10)
    assert result.std == pytest.approx(np.std(values), rel=1e-8)
    assert (result.subset_size, result.num_subsets) == (12, 4)


def test_kid_refuses_subsets_as_large_as_a_set_and_defaults_to_half_the_smaller_one():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(20, 3)), rng.normal(size=(30, 3)) + 1.0
    # A subset of all 20 samples is a permutation (MMD^2 ignores order): every subset agrees, std is noise.
    with pytest.raises(ValueError, match=r"kid_subset_size: 20 must be at least 2 and below the smaller set's 20"):
        kernel_inception_distance(real, fake, num_subsets=2, subset_size=20)
    with pytest.raises(ValueError, match="kid_subsets: 1 must be at least 2"):
        kernel_inception_distance(real, fake, num_subsets=1)
    result = kernel_inception_distance(real, fake, num_subsets=5)
    assert (result.subset_size, result.num_subsets) == (10, 5) and result.std > 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(8)
    same = kernel_inception_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), 10, 200)
    shifted = kernel_inception_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 1.0, 10, 200)
    assert abs(same.mean) < 0.05 < shifted.mean


# --- Inception Score ------------------------------------------------------------------------------------------

def test_confident_predictions_spread_over_all_classes_score_the_number_of_classes():
    classes = 10
    probabilities = np.eye(classes)[np.arange(100) % classes]  # each split of 10 covers every class once
    score = inception_score(probabilities, splits=10)
    assert score.mean == pytest.approx(classes, abs=1e-9)
    assert score.std == pytest.approx(0.0, abs=1e-9)


def test_identical_predictions_score_one():
    probabilities = np.tile([0.7, 0.2, 0.1], (50, 1))
    assert inception_score(probabilities, splits=5).mean == pytest.approx(1.0, abs=1e-12)
    assert inception_score_from_logits(np.tile([3.0, -1.0, 0.5, 2.0], (12, 1)), splits=3).mean == pytest.approx(1.0)


def test_inception_score_is_exp_of_the_mean_kl_in_each_split():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(12, 5)) * 2

    def split_score(rows):
        probabilities = [np.exp(row) / np.exp(row).sum() for row in rows]
        marginal = np.mean(probabilities, axis=0)
        kls = [sum(p[c] * math.log(p[c] / marginal[c]) for c in range(5)) for p in probabilities]
        return math.exp(np.mean(kls))

    whole = inception_score_from_logits(logits, splits=1)
    assert whole.mean == pytest.approx(split_score(logits), rel=1e-12)
    halves = inception_score_from_logits(logits, splits=2)
    expected = [split_score(logits[:6]), split_score(logits[6:])]
    assert halves.mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert halves.std == pytest.approx(np.std(expected), rel=1e-9)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert inception_score(softmax, splits=2).mean == pytest.approx(halves.mean, rel=1e-12)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="rows summing to 1"):
        inception_score(np.ones((4, 3)), splits=1)
    with pytest.raises(ValueError, match="splits: 5"):
        inception_score_from_logits(np.zeros((4, 3)), splits=5)


# --- precision / recall ---------------------------------------------------------------------------------------

def test_knn_radii_match_a_full_sort():
    rng = np.random.default_rng(10)
    points = rng.normal(size=(60, 4))
    full = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    expected = np.sort(full, axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(knn_squared_radii(points, 3, batch_size=7), expected, rtol=1e-9, atol=1e-9)


def test_identical_clouds_have_full_precision_and_recall():
    rng = np.random.default_rng(11)
    cloud = rng.normal(size=(500, 8))
    assert precision_recall(cloud, cloud)[:2] == (1.0, 1.0)
    other = precision_recall(cloud, rng.normal(size=(500, 8)))
    assert other.precision > 0.75 and other.recall > 0.75


def test_a_shifted_generated_cloud_lowers_precision_and_recall():
    rng = np.random.default_rng(12)
    real = rng.normal(size=(800, 8))
    same = precision_recall(real, rng.normal(size=(800, 8)))
    shifted = precision_recall(real, rng.normal(size=(800, 8)) + 2.0)
    assert shifted.precision < same.precision - 0.3
    assert shifted.recall < same.recall - 0.3


def test_a_generated_cloud_on_a_small_part_of_the_real_one_is_precise_but_has_low_recall():
    rng = np.random.default_rng(13)
    real = rng.normal(size=(1000, 4))
    collapsed = rng.normal(size=(1000, 4)) * 0.2  # mode collapse: realistic samples, little variety
    result = precision_recall(real, collapsed)
    assert result.precision > 0.95
    assert result.recall < 0.3


def test_precision_recall_does_not_depend_on_the_block_size():
    rng = np.random.default_rng(14)
    real, fake = rng.normal(size=(150, 5)), rng.normal(size=(120, 5)) * 0.8 + 0.3
    assert precision_recall(real, fake, batch_size=13) == precision_recall(real, fake, batch_size=10_000)


# --- extractors, report, reference cache ----------------------------------------------------------------------

def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Tanh())
    return nn.ModuleDict({"body": body, "head": nn.Linear(6, 3)})


def body_and_head(model, images):
    features = model["body"](images)
    return features, model["head"](features)


def image_batches(count=5, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 4, 4, generator=generator) for _ in range(count)]


def test_classifier_features_extract_features_and_logits_and_restore_training_mode():
    model = tiny_classifier()
    model.train()
    extractor = ClassifierFeatures(model, body_and_head, name="tiny-classifier", batch_size=3)
    batches = [{"image": images, "label": torch.zeros(8)} for images in image_batches()]
    extracted = extract_features(extractor, batches, max_samples=20, progress=False)
    assert extracted.extractor == "tiny-classifier"
    assert extracted.features.shape == (20, 6) and extracted.logits.shape == (20, 3)
    assert extractor.dim == 6 and model.training
    direct = model["body"](torch.cat(image_batches())[:20]).detach().numpy()
    np.testing.assert_allclose(extracted.features, direct, rtol=1e-5, atol=1e-6)


def test_compute_metrics_reports_every_metric_with_its_extractor_and_settings():
    rng = np.random.default_rng(15)
    real, fake = rng.normal(size=(60, 6)), rng.normal(size=(50, 6)) + 0.5
    report = compute_metrics(real, fake, logits=rng.normal(size=(50, 3)), extractor_name="tiny-classifier",
                             kid_subsets=5, kid_subset_size=40, is_splits=5)
    assert report["extractor"] == "tiny-classifier"
    assert (report["num_real"], report["num_fake"]) == (60, 50)
    assert report["fid"] == pytest.approx(fid_from_features(real, fake))
    assert report["kid_subset_size"] == 40 and report["is_splits"] == 5 and report["pr_k"] == 3
    for key in ("kid", "kid_std", "is", "is_std", "precision", "recall"):
        assert np.isfinite(report[key])
    with_statistics = compute_metrics(None, fake, metrics=["fid"], extractor_name="tiny-classifier",
                                      real_statistics=feature_statistics(real))
    assert with_statistics["fid"] == pytest.approx(report["fid"])
    assert "fid_offset" not in report


def test_compute_metrics_errors_name_the_problem():
    features = np.random.default_rng(16).normal(size=(10, 3))
    with pytest.raises(ValueError, match="unknown metric.*nll.*known: fid, kid, is, pr"):
        compute_metrics(features, features, metrics=["fid", "nll"], extractor_name="x")
    with pytest.raises(ValueError, match="needs class logits"):
        compute_metrics(features, features, metrics=["is"], extractor_name="x")
    with pytest.raises(ValueError, match="extractor_name is required"):
        compute_metrics(features, features, metrics=["fid"], extractor_name="")


class NotIterable:
    def __iter__(self):
        raise AssertionError("a cache hit must not read any data")


def test_reference_statistics_are_computed_once_then_read_from_the_cache(tmp_path):
    extractor = ClassifierFeatures(tiny_classifier(), body_and_head, name="tiny-classifier")
    settings = dict(content_hash="abc123", split="train", num_samples=30, cache_dir=tmp_path, max_features=10,
                    progress=False)
    computed = load_or_compute_reference(image_batches(), extractor, **settings)
    assert not computed.from_cache and computed.path.is_file()
    assert computed.path == reference_path(tmp_path, "abc123", "train", "tiny-classifier", 30)
    assert computed.count == 30 and computed.features.shape == (10, 6)
    all_features = extract_features(extractor, image_batches(), max_samples=30, progress=False).features
    expected_mu, expected_sigma = feature_statistics(all_features)
    np.testing.assert_allclose(computed.mu, expected_mu, rtol=1e-6)
    np.testing.assert_allclose(computed.sigma, expected_sigma, rtol=1e-5, atol=1e-9)
    assert all(any(np.array_equal(row, other) for other in all_features) for row in computed.features)

    cached = load_or_compute_reference(NotIterable(), extractor, **settings)
    assert cached.from_cache and cached.count == 30
    np.testing.assert_array_equal(cached.sigma, computed.sigma)
    np.testing.assert_array_equal(cached.features, computed.features)


@pytest.mark.parametrize("change", [{"content_hash": "def456"}, {"split": "test"}, {"num_samples": 20},
                                    {"max_features": 20}])
def test_a_different_key_or_a_larger_feature_cap_misses_the_cache(tmp_path, change):
    extractor = ClassifierFeatures(tiny_classifier(), body_and_head, name="tiny-classifier")
    settings = dict(content_hash="abc123", split="train", num_samples=30, cache_dir=tmp_path, max_features=10,
                    progress=False)
    load_or_compute_reference(image_batches(), extractor, **settings)
    again = load_or_compute_reference(image_batches(), extractor, **{**settings, **change})
    assert not again.from_cache


def test_another_extractor_and_a_corrupt_file_miss_the_cache(tmp_path):
    settings = dict(content_hash="abc123", split="train", num_samples=30, cache_dir=tmp_path, progress=False)
    first = ClassifierFeatures(tiny_classifier(0), body_and_head, name="classifier-a")
    second = ClassifierFeatures(tiny_classifier(1), body_and_head, name="classifier-b")
    a = load_or_compute_reference(image_batches(), first, **settings)
    b = load_or_compute_reference(image_batches(), second, **settings)
    assert not b.from_cache and a.path != b.path
    a.path.write_bytes(b"not an npz")
    assert not load_or_compute_reference(image_batches(), first, **settings).from_cache
    assert load_or_compute_reference(NotIterable(), first, **settings).from_cache


def test_reference_cache_lives_under_the_gentrain_cache(gentrain_cache):
    assert default_cache_dir() == gentrain_cache / "metrics-reference"
