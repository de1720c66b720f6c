"""Feature extractors by name: `inception` or `classifier:REF` (spec field eval.extractor, flag --extractor).

    from gentrain.evaluation.extractors import make_extractor
    extractor = make_extractor("classifier:runs/classifier-debug", expected_shape=(1, 8, 8))
    extractor.name    # classifier:classifier-debug@step-00000200#1f2e3d4c  (in every report)
    extractor.label   # classifier-classifier-debug                          (in MLflow metric keys)

REF is anything `gentrain sample` takes (checkpoint folder, run folder, MLflow run id)
of a run whose network has `features_and_logits(images)`, such as the `classifier` job
type. The name carries the checkpoint step and a digest of its weights, so reference
statistics cached under it are never reused for a retrained classifier.
"""

from __future__ import annotations

import re

import torch

from gentrain.metrics.features import ClassifierFeatures, InceptionFeatures

CLASSIFIER_PREFIX = "classifier:"


def check_extractor_choice(choice: str) -> str | None:
    """A problem with an extractor name, or None."""
    if choice == "inception" or (choice.startswith(CLASSIFIER_PREFIX) and len(choice) > len(CLASSIFIER_PREFIX)):
        return None
    return (f"{choice!r} is not an extractor; use 'inception' (the FID Inception network) or "
            "'classifier:REF' (a classifier run's checkpoint or run folder, or its MLflow run id)")


def make_extractor(choice: str, inception_weights: str | None = None, device: str | torch.device = "cpu",
                   expected_shape: tuple[int, ...] | None = None):
    problem = check_extractor_choice(choice)
    if problem:
        raise ValueError(f"extractor: {problem}")
    if choice == "inception":
        extractor = InceptionFeatures(weights=inception_weights, device=device)
        extractor.label = "inception" + extractor.name[len("inception-v3-fid-2015-12-05"):].replace("+", "-")
        extractor.logits_dim = extractor.network.fc.out_features
        return extractor
    return classifier_extractor(choice[len(CLASSIFIER_PREFIX):], device, expected_shape)


def classifier_extractor(ref: str, device: str | torch.device = "cpu", expected_shape: tuple[int, ...] | None = None):
    from gentrain.checkpoint import MODEL_FILE
    from gentrain.inference import load_trained
    from gentrain.metrics.inception_weights import file_sha256

    trained = load_trained(ref, device=device)
    networks = [module for module in trained.modules.values() if hasattr(module, "features_and_logits")]
    if len(networks) != 1:
        raise ValueError(f"extractor classifier:{ref}: a {trained.spec.job.type!r} run has no network with "
                         "features_and_logits(images); train one with `gentrain run classifier/debug` (or "
                         "classifier/mnist) and pass its run folder")
    network = networks[0]
    shape = getattr(network, "shape", None)
    if expected_shape is not None and shape is not None and tuple(shape) != tuple(expected_shape):
        raise ValueError(f"extractor classifier:{ref} was trained on images of shape {list(shape)}, but the "
                         f"images to score have shape {list(expected_shape)}; train a classifier on the same data")
    digest = file_sha256(trained.checkpoint / MODEL_FILE)[:8]
    name = f"{CLASSIFIER_PREFIX}{trained.spec.name}@step-{trained.step:08d}#{digest}"
    extractor = ClassifierFeatures(network, lambda model, images: model.features_and_logits(images), name,
                                   dim=getattr(network, "feature_dim", None))
    extractor.label = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"classifier-{trained.spec.name}")
    extractor.logits_dim = getattr(network, "num_classes", None)
    extractor.weights_sha256 = digest
    return extractor
