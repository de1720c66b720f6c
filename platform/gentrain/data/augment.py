"""Training-time augmentation inside the data pipeline (never applied to evaluation).

    data:
      augment: {flip: true, crop_padding: 4}

`flip` mirrors each image left-right with probability 1/2; `crop_padding: P`
pads every side with P zero (black) pixels and crops a random window of the
original size back out, shifting the image by up to P pixels each way. Both act
on whole batches after collation, drawing from a generator seeded by (seed,
epoch, rank, loader worker): a run is reproducible, a resumed run augments its
batches exactly as an uninterrupted one would, and no two readers repeat each
other's draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gentrain.data.errors import DataConfigError
from gentrain.data.reader import worker_slot


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    crop_padding: int = 0

    def __post_init__(self):
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise DataConfigError(
                f"data.augment.crop_padding: {self.crop_padding!r} must be a whole number of pixels >= 0 "
                "(0 turns pad-and-crop off)"
            )

    @property
    def enabled(self) -> bool:
        return self.flip or self.crop_padding > 0


class AugmentBatches:
    """Pipeline stage: batches {"image": [B, C, H, W], ...} -> the same batches, augmented."""

    def __init__(self, augmentation: Augmentation, seed: int, epoch: int, rank: int):
        self.augmentation, self.seed, self.epoch, self.rank = augmentation, seed, epoch, rank

    def __call__(self, batches):
        worker = worker_slot()[0]
        stream_seed = random.Random(f"augment:{self.seed}:{self.epoch}:{self.rank}:{worker}").getrandbits(63)
        generator = torch.Generator().manual_seed(stream_seed)
        for batch in batches:
            batch["image"] = augment_images(batch["image"], self.augmentation, generator)
            yield batch


def augment_images(images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Flip and/or pad-and-crop a [B, C, H, W] batch, each image drawing its own choices."""
    count, _, height, width = images.shape
    if augmentation.flip:
        mirrored = torch.rand(count, generator=generator) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    padding = augmentation.crop_padding
    if padding:
        padded = F.pad(images, (padding, padding, padding, padding))
        corners = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator).tolist()
        images = torch.stack([padded[i, :, top : top + height, left : left + width]
                              for i, (top, left) in enumerate(corners)])
    return images
