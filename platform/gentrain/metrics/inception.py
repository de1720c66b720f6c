"""The Inception-v3 network used for FID, on plain torch (torchvision does not import beside our torch).

    from gentrain.metrics.inception import FIDInceptionV3
    network = FIDInceptionV3.from_weights()          # path or $GENTRAIN_INCEPTION_WEIGHTS
    pool, logits = network(images)                   # [N, 2048], [N, 1008]; images [N, C, H, W] in [0, 1]

This is the architecture of TensorFlow's 2015-12-05 Inception graph as pytorch-fid
ports it, which is what published FID numbers use. It differs from torchvision's
ImageNet Inception-v3 in four places, each reproduced here:
- the 35x35, 17x17 and first 8x8 blocks (pytorch-fid's FIDInceptionA, FIDInceptionC,
  FIDInceptionE_1) average-pool with count_include_pad=False: TF's average pool does
  not count the padding;
- the last block (FIDInceptionE_2) max-pools its pool branch instead of averaging;
- the classifier has 1008 outputs;
- there is no auxiliary classifier.

Preprocessing, exactly as pytorch-fid's InceptionV3(resize_input=True,
normalize_input=True): images in [0, 1] are resized with
`F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)` (no
antialiasing) and mapped to [-1, 1] by 2x - 1; grayscale is repeated to 3 channels.
This resize is pytorch-fid's, not the TF graph's own bilinear resize, so numbers
match pytorch-fid's (the community reference), not the original TF code's to the
last digit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from gentrain.metrics import inception_weights
from gentrain.metrics.inception_weights import NUM_CLASSES, POOL_DIM

INPUT_SIZE = 299


class ConvUnit(nn.Module):
    """Convolution without bias, batch norm (TF's eps 0.001), ReLU: the graph's only layer type."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average_pool(x: torch.Tensor) -> torch.Tensor:
    # count_include_pad=False: TF divides by the number of real pixels in the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):
    """35x35 block (Mixed_5b/c/d; pytorch-fid's FIDInceptionA): 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvUnit(in_channels, 64, 1)
        self.branch5x5_1 = ConvUnit(in_channels, 48, 1)
        self.branch5x5_2 = ConvUnit(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvUnit(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, padding=1)
        self.branch_pool = ConvUnit(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), five, double, self.branch_pool(_average_pool(x))], 1)


class Reduction35(nn.Module):
    """35x35 -> 17x17 (Mixed_6a): 384 + 96 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvUnit(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvUnit(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class Block17(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b-e; pytorch-fid's FIDInceptionC): 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvUnit(in_channels, 192, 1)
        self.branch7x7_1 = ConvUnit(in_channels, c7, 1)
        self.branch7x7_2 = ConvUnit(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvUnit(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvUnit(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvUnit(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvUnit(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvUnit(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvUnit(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvUnit(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_average_pool(x))], 1)


class Reduction17(nn.Module):
    """17x17 -> 8x8 (Mixed_7a): 320 + 192 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvUnit(in_channels, 192, 1)
        self.branch3x3_2 = ConvUnit(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvUnit(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvUnit(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvUnit(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvUnit(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([three, seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class Block8(nn.Module):
    """8x8 block with split 1x3/3x1 branches (Mixed_7b/c): 2048 channels.

    pool="average" is pytorch-fid's FIDInceptionE_1 (Mixed_7b); pool="max" its
    FIDInceptionE_2 (Mixed_7c), where the TF graph max-pools.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("average", "max"):
            raise ValueError(f"pool: {pool!r} is not one of 'average', 'max'")
        self.pool = pool
        self.branch1x1 = ConvUnit(in_channels, 320, 1)
        self.branch3x3_1 = ConvUnit(in_channels, 384, 1)
        self.branch3x3_2a = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvUnit(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvUnit(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvUnit(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _average_pool(x)
        return torch.cat([self.branch1x1(x), three, double, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] -> (2048-d pool features, 1008-way logits). Attribute names are the weight file's keys."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_features=32)
        self.Mixed_5c = Block35(256, pool_features=64)
        self.Mixed_5d = Block35(288, pool_features=64)
        self.Mixed_6a = Reduction35(288)
        self.Mixed_6b = Block17(768, channels_7x7=128)
        self.Mixed_6c = Block17(768, channels_7x7=160)
        self.Mixed_6d = Block17(768, channels_7x7=160)
        self.Mixed_6e = Block17(768, channels_7x7=192)
        self.Mixed_7a = Reduction17(768)
        self.Mixed_7b = Block8(1280, pool="average")
        self.Mixed_7c = Block8(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.weights_sha256: str | None = None  # set by from_weights, so reports can name the exact file
        self.eval()  # batch norm must use the file's running statistics, never batch ones

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None) -> "FIDInceptionV3":
        """The network with the standard weights (path, else $GENTRAIN_INCEPTION_WEIGHTS); sha256 in .weights_sha256."""
        state, sha256 = inception_weights.load_state_dict(path)
        network = cls()
        network.load_state_dict(state, strict=True)
        network.weights_sha256 = sha256
        return network

    def forward(self, images: torch.Tensor, logits_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [N, 2048], logits [N, 1008]).

        logits_bias=False gives pool @ fc.weight^T without the bias, which is what the
        original Inception Score code computes (it multiplies pool_3 by the softmax
        layer's weight matrix only); True adds the bias, as the full graph does.
        """
        pool = self.pool_features(prepare_images(images))
        logits = F.linear(pool, self.fc.weight, self.fc.bias if logits_bias else None)
        return pool, logits

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 299, 299] in [-1, 1] -> the 2048-d average of Mixed_7c (FID's features)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """[N, 1 or 3, H, W] in [0, 1] -> [N, 3, 299, 299] in [-1, 1], pytorch-fid's way."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0
