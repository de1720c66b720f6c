"""Evaluation metrics of generative models: FID, KID, Inception Score, precision/recall.

    from gentrain.metrics import InceptionFeatures, extract_features, compute_metrics
    extractor = InceptionFeatures()          # needs pt_inception-2015-12-05-6726825d.pth (see inception_weights.py)
    real = extract_features(extractor, real_batches, max_samples=10_000)
    fake = extract_features(extractor, generated_batches, max_samples=10_000)
    report = compute_metrics(real.features, fake.features, logits=fake.logits, extractor_name=extractor.name)

    PYTHONPATH=platform .venv/bin/python -m pytest tests/unit/test_metrics.py tests/unit/test_inception.py -q

The metric functions (frechet, kid, inception_score, precision_recall) take numpy
feature arrays and know nothing of networks; features.py turns images into features
with the FID Inception network (inception.py) or any classifier; reference.py caches
a data set's side of the comparison; summary.py sums features across workers and makes
the report (summary_metrics; compute_metrics for features held in memory).
"""

from gentrain.metrics.features import (ClassifierFeatures, ExtractedFeatures, FeatureExtractor, InceptionFeatures,
                                       extract_features, features_and_logits, iterate_features)
from gentrain.metrics.frechet import (FrechetTerms, RunningStatistics, feature_statistics, fid_from_features,
                                      frechet_distance, frechet_distance_terms)
from gentrain.metrics.inception import FIDInceptionV3, prepare_images
from gentrain.metrics.inception_score import InceptionScore, inception_score, inception_score_from_logits
from gentrain.metrics.inception_weights import (InceptionWeightsMismatchError, InceptionWeightsNotFoundError,
                                                expected_state_dict_shapes)
from gentrain.metrics.kid import KernelDistance, kernel_inception_distance, unbiased_mmd2
from gentrain.metrics.precision_recall import PrecisionRecall, precision_recall
from gentrain.metrics.reference import ReferenceStatistics, load_or_compute_reference, load_reference
from gentrain.metrics.summary import SAMPLE_METRICS, FeatureSummary, compute_metrics, summary_metrics

__all__ = [
    "ClassifierFeatures", "ExtractedFeatures", "FeatureExtractor", "InceptionFeatures", "extract_features",
    "features_and_logits", "iterate_features", "FrechetTerms", "RunningStatistics", "feature_statistics",
    "fid_from_features", "frechet_distance", "frechet_distance_terms", "FIDInceptionV3", "prepare_images",
    "InceptionScore", "inception_score", "inception_score_from_logits", "InceptionWeightsMismatchError",
    "InceptionWeightsNotFoundError", "expected_state_dict_shapes", "KernelDistance", "kernel_inception_distance",
    "unbiased_mmd2", "PrecisionRecall", "precision_recall", "ReferenceStatistics", "load_or_compute_reference",
    "load_reference", "SAMPLE_METRICS", "FeatureSummary", "compute_metrics", "summary_metrics",
]
