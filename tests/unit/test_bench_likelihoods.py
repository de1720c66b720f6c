"""`gentrain bench likelihoods`' data: builtin:mnist5k's own split, every pixel 0 or 255.
(The bench itself trains three models through `gentrain run`: a benchmark, not a test.)"""

import numpy as np
import torch

from gentrain.bench.likelihoods import pack_binarized_mnist5k
from gentrain.data.index import load_index
from gentrain.data.pipeline import eval_batches
from gentrain.data.sources import open_source


def test_binarized_mnist5k_keeps_the_builtin_split_and_thresholds_at_128(tmp_path):
    out = pack_binarized_mnist5k(tmp_path / "binary")
    index = load_index(str(out))
    source = open_source("mnist5k")
    for split in ("train", "test"):
        assert index.splits[split].total == source.count(split)
    images = torch.cat([batch["image"] for batch in eval_batches(index, "test", 250, 0, 1)])
    expected = np.stack([image for image, _ in source.samples("test")]) >= 128
    assert set(images.unique().tolist()) == {0.0, 1.0}
    # the same images (the pack may order them otherwise), each pixel thresholded at 128
    packed = sorted(image.numpy().astype(bool).tobytes() for image in images.squeeze(1))
    assert packed == sorted(image.tobytes() for image in expected[..., 0])
    assert pack_binarized_mnist5k(out) == out and not (tmp_path / "binary.npz").exists()  # packed once
