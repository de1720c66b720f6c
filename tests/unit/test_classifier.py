"""The classifier job type learns digits from packed shards, and its features plug into the metrics.

    .venv/bin/pytest tests/unit/test_classifier.py -q
"""

import numpy as np
import pytest
import torch

from gentrain.engine import Engine
from gentrain.data.pipeline import eval_batches, train_batches
from gentrain.registry import DataInfo, SampleRequest
from gentrain.validation import load_spec
from gentrain_jobs.classifier import ClassifierConfig, build


@pytest.fixture(scope="module")
def trained(one_thread):
    """The debug spec's network trained 150 steps on the packed digits (one process)."""
    spec = load_spec("classifier/debug", ["train.steps=150"])
    engine = Engine(spec, print_fn=None)
    batches = train_batches(engine.index, "train", 32, 0, 1, seed=0)
    history = [engine.optimizer_step(batches) for _ in range(spec.train.steps)]
    return engine.job, engine.strategy.unwrap("classifier").eval(), engine.index, history


def test_learns_digits_far_above_chance(trained):
    job, model, index, history = trained
    totals = {"accuracy": 0.0, "loss": 0.0}
    count = 0
    for batch in eval_batches(index, "test", 64, 0, 1):
        metrics = job.evaluate({"classifier": model}, ClassifierConfig(), batch, torch.Generator())
        for key in totals:
            totals[key] += metrics[key] * len(batch["label"])
        count += len(batch["label"])
    accuracy, loss = totals["accuracy"] / count, totals["loss"] / count
    print(f"held-out accuracy {accuracy:.3f}, loss {loss:.3f} on {count} digits; "
          f"first train loss {history[0]['loss']:.3f}, last {history[-1]['loss']:.3f}")
    assert count == index.total("test")
    assert accuracy > 0.85  # chance is 0.1
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_features_and_logits_are_the_penultimate_layer_and_the_head(trained):
    _, model, _, _ = trained
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        features, logits = model.features_and_logits(images)
        assert features.shape == (5, model.feature_dim) and logits.shape == (5, 10)
        torch.testing.assert_close(model.head(features), logits)
        torch.testing.assert_close(model(images), logits)
    assert (features >= 0).all()  # after the ReLU


def test_class_visualisations_raise_their_class_logit_and_stay_in_range(trained):
    job, model, _, _ = trained
    images = job.sample({"classifier": model}, ClassifierConfig(), SampleRequest(20, torch.Generator().manual_seed(0)))
    assert images.shape == (20, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    assert (predicted == torch.arange(20) % 10).float().mean() >= 0.8
    threes = job.sample({"classifier": model}, ClassifierConfig(),
                        SampleRequest(10, torch.Generator().manual_seed(1), labels=torch.full((10,), 3)))
    with torch.no_grad():
        assert (model(threes).argmax(dim=1) == 3).float().mean() >= 0.8  # conditioned on the labels asked for


def test_unlabelled_or_non_image_data_is_a_clear_error():
    with pytest.raises(ValueError, match="num_classes=0"):
        build(ClassifierConfig(), DataInfo((1, 8, 8), 0))
    with pytest.raises(ValueError, match="image data"):
        build(ClassifierConfig(), DataInfo((256,), 10))


def test_eight_pixel_inputs_stop_pooling_at_one_pixel():
    model = build(ClassifierConfig(channels=[8, 8, 8, 8, 8]), DataInfo((1, 8, 8), 10))["classifier"]
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert np.isfinite(model.features_and_logits(torch.rand(2, 1, 8, 8))[0].detach().numpy()).all()
