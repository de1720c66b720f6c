"""The FID Inception network: weight-file layout, loading, preprocessing, output shapes; no real weights needed.

    PYTHONPATH=platform .venv/bin/python -m pytest tests/unit/test_inception.py -q
"""

import math

import pytest
import torch

from gentrain.metrics import FIDInceptionV3, InceptionFeatures, prepare_images
from gentrain.metrics.inception_weights import (EXPECTED_CONVOLUTIONS, OPTIONAL_SUFFIX, WEIGHTS_ENV,
                                                WEIGHTS_FILE_NAME, WEIGHTS_URL, InceptionWeightsMismatchError,
                                                InceptionWeightsNotFoundError, expected_state_dict_shapes,
                                                resolve_weights_path)


def random_state_dict(seed=0, with_counters=True):
    """A state dict with the weight file's keys and shapes and random values that keep activations finite."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_state_dict_shapes().items():
        if key.endswith(OPTIONAL_SUFFIX):
            if with_counters:
                state[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("conv.weight"):
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif key.endswith(("bn.weight", "bn.running_var")):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:  # bn.bias, bn.running_mean, fc.weight, fc.bias
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def network():
    model = FIDInceptionV3()
    model.load_state_dict(random_state_dict(), strict=True)
    return model


def test_the_written_layer_list_has_the_94_conv_units_and_the_fc_of_the_weight_file():
    shapes = expected_state_dict_shapes()
    assert len(EXPECTED_CONVOLUTIONS.strip().splitlines()) == 94
    assert len(shapes) == 94 * 6 + 2
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.bn.running_var"] == (32,)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any(key.startswith("AuxLogits") for key in shapes)


def test_the_network_has_exactly_the_keys_and_shapes_of_the_weight_file():
    own = {key: tuple(value.shape) for key, value in FIDInceptionV3().state_dict().items()}
    expected = expected_state_dict_shapes()
    assert sorted(own.keys() - expected.keys()) == []
    assert sorted(expected.keys() - own.keys()) == []
    assert {key: shape for key, shape in own.items() if shape != expected[key]} == {}


@pytest.mark.parametrize("with_counters", [True, False])
def test_a_weight_file_with_the_standard_keys_loads_strictly(tmp_path, with_counters):
    path = tmp_path / WEIGHTS_FILE_NAME
    state = random_state_dict(seed=1, with_counters=with_counters)
    torch.save(state, path)
    model = FIDInceptionV3.from_weights(path)
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    torch.testing.assert_close(model.fc.bias, state["fc.bias"])
    assert len(model.weights_sha256) == 64


def test_a_weight_file_is_found_through_the_environment(tmp_path, monkeypatch):
    path = tmp_path / WEIGHTS_FILE_NAME
    path.write_bytes(b"x")
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    assert resolve_weights_path() == path


def test_a_missing_weight_file_says_where_to_get_it_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsNotFoundError) as no_path:
        FIDInceptionV3.from_weights()
    message = str(no_path.value)
    assert WEIGHTS_URL in message and WEIGHTS_ENV in message and "never downloads" in message
    assert WEIGHTS_URL == ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                           "pt_inception-2015-12-05-6726825d.pth")
    missing = tmp_path / "nowhere" / WEIGHTS_FILE_NAME
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(InceptionWeightsNotFoundError, match=f"\\${WEIGHTS_ENV} points to {missing}"):
        FIDInceptionV3.from_weights()


def test_a_file_with_other_keys_or_shapes_is_refused_by_name(tmp_path):
    state = random_state_dict()
    del state["Mixed_6e.branch_pool.conv.weight"]
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(InceptionWeightsMismatchError) as error:
        FIDInceptionV3.from_weights(path)
    message = str(error.value)
    assert "Mixed_6e.branch_pool.conv.weight" in message and "AuxLogits.fc.weight" in message
    assert "fc.weight: (1000, 2048), expected (1008, 2048)" in message


def test_preprocessing_is_bilinear_to_299_and_maps_0_1_to_minus_1_1():
    gray = torch.rand(2, 1, 28, 28)
    prepared = prepare_images(gray)
    assert prepared.shape == (2, 3, 299, 299)
    torch.testing.assert_close(prepared[:, 0], prepared[:, 2])
    expected = torch.nn.functional.interpolate(gray.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                                               align_corners=False) * 2 - 1
    torch.testing.assert_close(prepared, expected)
    assert prepare_images(torch.ones(1, 3, 8, 8)).eq(1).all() and prepare_images(torch.zeros(1, 3, 8, 8)).eq(-1).all()
    with pytest.raises(ValueError, match="1 or 3"):
        prepare_images(torch.rand(1, 4, 8, 8))


def test_the_network_gives_2048_features_and_1008_logits(network):
    pool, logits = network(torch.rand(2, 1, 32, 32))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all()
    assert (pool >= 0).all()  # an average of ReLU outputs
    torch.testing.assert_close(logits, pool @ network.fc.weight.T)  # no bias by default, as the IS code


def test_inception_features_extractor_quantises_and_names_itself(network):
    extractor = InceptionFeatures(network=network, device="cpu")
    assert extractor.name == "inception-v3-fid-2015-12-05" and extractor.dim == 2048
    images = torch.rand(1, 3, 16, 16)  # one image: each forward at 299x299 costs seconds on a shared CPU
    features, logits = extractor.features_and_logits(images)
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    with torch.inference_mode():
        expected, _ = network(torch.round(images * 255) / 255)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert InceptionFeatures(network=network, device="cpu", quantize=False).name.endswith("+float-input")
