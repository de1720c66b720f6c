"""A small conv classifier whose penultimate layer is a feature space for FID/KID/PR.

    model = ConvClassifier((1, 28, 28), num_classes=10, channels=[32, 64], feature_dim=128)
    features, logits = model.features_and_logits(images)   # [N, 128], [N, 10]

Each stage is two 3x3 conv + batch-norm + ReLU units and a 2x2 max-pool (28 -> 14 -> 7,
8 -> 4 -> 2); a global average pool and a linear layer with ReLU give the features,
a last linear layer the logits. Inputs are images in [0, 1], as batches and samples come.
"""

from __future__ import annotations

import torch
from torch import nn


def _unit(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class ConvClassifier(nn.Module):
    def __init__(self, shape: tuple[int, ...], num_classes: int, channels: list[int], feature_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.shape, self.num_classes, self.feature_dim = tuple(shape), num_classes, feature_dim
        layers: list[nn.Module] = []
        in_channels, side = shape[0], min(shape[1:])
        for width in channels:
            layers += _unit(in_channels, width) + _unit(width, width)
            if side >= 2:  # an 8x8 input stops halving at 1x1
                layers.append(nn.MaxPool2d(2))
                side //= 2
            in_channels = width
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(in_channels, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(images * 2.0 - 1.0).mean(dim=(2, 3))
        features = self.embed(hidden)
        return features, self.head(self.dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]
