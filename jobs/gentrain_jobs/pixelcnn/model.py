"""Gated PixelCNN networks (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders").

Two stacks per layer, so the receptive field has no blind spot:

- the vertical stack at row i sees the input's rows <= i (a (k//2 + 1) x k convolution
  padded from above); it reaches the horizontal stack only shifted down one row, so the
  horizontal stack at row i gets rows < i from it;
- the horizontal stack sees the pixels left of (and at) the current one on its row (a
  1 x (k//2 + 1) convolution padded from the left); at the current pixel a channel mask
  keeps the R -> G -> B order: type A (the first layer) lets group c see the input's
  groups < c, type B (later layers) the groups <= c of the features.

Each layer: [tanh(f) * sigmoid(g)] gates in both stacks (a class embedding added to f
and g when conditioned), a residual 1x1 in the horizontal stack and a 1x1 skip to the
output head (ReLU, 1x1, ReLU, 1x1). Channel c of every feature map belongs to colour
group c % groups; widths are multiples of the group count, so the tanh and sigmoid
halves of a 2*width map pair channels of the same group. groups is the number of image
channels for the softmax and Bernoulli heads (sub-pixels predicted in turn) and 1 for the
logistic mixture (PixelCNN++ predicts whole pixels; its colour coefficients order them).

Sampling runs the stacks apart (`row_context`, `horizontal_row`): the vertical stack once
per image row, the horizontal stack and head on one row per sub-pixel (sampling.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def channel_mask(out_width: int, in_width: int, groups: int, kind: str) -> torch.Tensor:
    """[out, in] 0/1: channel o may read channel i at the same pixel (group = index % groups).
    Type A: strictly earlier groups; type B: earlier or the same."""
    out_group = torch.arange(out_width)[:, None] % groups
    in_group = torch.arange(in_width)[None, :] % groups
    allowed = out_group > in_group if kind == "A" else out_group >= in_group
    return allowed.float()


class MaskedConv2d(nn.Conv2d):
    """A convolution (no padding of its own) whose kernel is multiplied by a fixed 0/1 mask."""

    def __init__(self, in_width: int, out_width: int, kernel: tuple[int, int], mask: torch.Tensor):
        super().__init__(in_width, out_width, kernel)
        # Not saved: it follows from the config. Cast at use: DeepSpeed bf16 casts weights, not buffers.
        self.register_buffer("mask", mask.view(out_width, in_width, *kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


def pointwise(in_width: int, out_width: int, groups: int) -> MaskedConv2d:
    """A 1x1 convolution that keeps the colour order (type B)."""
    return MaskedConv2d(in_width, out_width, (1, 1), channel_mask(out_width, in_width, groups, "B"))


def horizontal_conv(in_width: int, out_width: int, kernel: int, groups: int, kind: str) -> MaskedConv2d:
    """1 x (kernel//2 + 1): the pixels to the left in full, the current one through the channel mask."""
    width = kernel // 2 + 1
    mask = torch.ones(out_width, in_width, 1, width)
    mask[:, :, 0, -1] = channel_mask(out_width, in_width, groups, kind)
    return MaskedConv2d(in_width, out_width, (1, width), mask)


def gate(pre: torch.Tensor) -> torch.Tensor:
    f, g = pre.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i gets row i - 1 (row 0 zeros): the vertical stack's rows <= i become rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    def __init__(self, in_width: int, width: int, kernel: int, groups: int, *, first: bool, last: bool,
                 num_classes: int):
        super().__init__()
        self.half = kernel // 2
        self.first = first
        self.vertical = nn.Conv2d(in_width, 2 * width, (self.half + 1, kernel))
        self.vertical_to_horizontal = nn.Conv2d(2 * width, 2 * width, 1)
        self.horizontal = horizontal_conv(in_width, 2 * width, kernel, groups, "A" if first else "B")
        # The last layer's horizontal output feeds nothing (only its skip does): no residual
        # convolution there, so every parameter gets a gradient (DDP insists).
        self.residual = None if last else pointwise(width, width, groups)
        self.skip = pointwise(width, width, groups)
        self.embedding = nn.Embedding(num_classes, 2 * width) if num_classes else None

    def condition(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The class's bias on the gates' pre-activations, [B, 2*width, 1, 1]."""
        if self.embedding is None:
            return None
        return self.embedding(labels)[:, :, None, None]

    def vertical_pre(self, v: torch.Tensor) -> torch.Tensor:
        """Pre-activations at row i from rows i - k//2 .. i of v."""
        return self.vertical(F.pad(v, (self.half, self.half, self.half, 0)))

    def vertical_out(self, pre: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return gate(pre if cond is None else pre + cond)

    def horizontal_step(self, h: torch.Tensor, from_vertical: torch.Tensor,
                        cond: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(next horizontal features, skip); from_vertical: vertical_to_horizontal of the
        shifted vertical pre-activations, rows < i only."""
        pre = self.horizontal(F.pad(h, (self.half, 0, 0, 0))) + from_vertical
        gated = gate(pre if cond is None else pre + cond)
        out = None if self.residual is None else self.residual(gated) + (0 if self.first else h)
        return out, self.skip(gated)

    def forward(self, v, h, cond):
        pre = self.vertical_pre(v)
        h, skip = self.horizontal_step(h, self.vertical_to_horizontal(shift_down(pre)), cond)
        return self.vertical_out(pre, cond), h, skip


class GatedPixelCNN(nn.Module):
    """Input: images scaled to [-1, 1], [B, C, H, W]; output [B, out_channels, H, W], whose
    channel o belongs to colour group o % groups."""

    def __init__(self, shape: tuple[int, int, int], out_channels: int, *, width: int, layers: int, kernel: int,
                 first_kernel: int, head_width: int, groups: int, num_classes: int = 0):
        super().__init__()
        self.shape = tuple(shape)  # (C, H, W) of one image
        in_channels = shape[0]
        self.groups, self.num_classes = groups, num_classes
        self.layers = nn.ModuleList([
            GatedLayer(in_channels if i == 0 else width, width, first_kernel if i == 0 else kernel, groups,
                       first=i == 0, last=i == layers - 1, num_classes=num_classes)
            for i in range(layers)])
        self.head = nn.Sequential(nn.ReLU(), pointwise(width, head_width, groups), nn.ReLU(),
                                  pointwise(head_width, out_channels, groups))
        self.grad_checkpointing = False

    def enable_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def conditions(self, labels: torch.Tensor | None) -> list[torch.Tensor | None]:
        if self.num_classes and labels is None:
            raise ValueError("this PixelCNN is class-conditional (job.config.class_conditional: true): "
                             "it needs labels")
        return [layer.condition(labels) if self.num_classes else None for layer in self.layers]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        conds = self.conditions(labels)
        v, h, skips = x, x, 0
        for layer, cond in zip(self.layers, conds):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                v, h, skip = checkpoint(layer, v, h, cond, use_reentrant=False)
            else:
                v, h, skip = layer(v, h, cond)
            skips = skips + skip
        return self.head(skips)

    # -- sampling: the two stacks apart ---------------------------------------------
    def row_context(self, x_above: torch.Tensor, conds: list) -> list[torch.Tensor]:
        """What the vertical stack hands each layer's horizontal stack at the row below
        `x_above` (the finished rows, [B, C, r, W]; r may be 0): one [B, 2*width, 1, W] per layer."""
        contexts = []
        if x_above.shape[2] == 0:  # the first row sees nothing above: the 1x1's bias alone
            for layer in self.layers:
                zeros = x_above.new_zeros(x_above.shape[0], layer.vertical.out_channels, 1, x_above.shape[3])
                contexts.append(layer.vertical_to_horizontal(zeros))
            return contexts
        v = x_above
        for layer, cond in zip(self.layers, conds):
            pre = layer.vertical_pre(v)
            contexts.append(layer.vertical_to_horizontal(pre[:, :, -1:]))
            v = layer.vertical_out(pre, cond)
        return contexts

    def horizontal_row(self, x_row: torch.Tensor, contexts: list, conds: list) -> torch.Tensor:
        """The output on one row [B, out, 1, W] from that row's input and its row_context."""
        h, skips = x_row, 0
        for layer, context, cond in zip(self.layers, contexts, conds):
            h, skip = layer.horizontal_step(h, context, cond)
            skips = skips + skip
        return self.head(skips)
