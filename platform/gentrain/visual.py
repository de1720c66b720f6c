"""Sample artifacts: image grids (PIL only; torchvision does not import beside our torch), and
token samples as text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MIN_TILE = 32  # upscale tiny images (8x8 digits) so a grid is readable


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] -> one uint8 HxWxC (or HxW) array."""
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    n, channels, height, width = images.shape
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        height, width = height * scale, width * scale
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for i in range(n):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = images[i].clamp(0, 1)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if channels == 1 else array


def inpainting_grid(originals: torch.Tensor, masked: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
    """(original, masked, completion) triples of [n, C, H, W] images in [0, 1], in that order,
    padded with white to at least 9 images (a 3x3 grid, so a triple never wraps)."""
    grid = torch.stack([originals, masked, completed.to(originals.device)], dim=1).flatten(0, 1)
    if len(grid) < 9:
        grid = torch.cat([grid, grid.new_ones(9 - len(grid), *grid.shape[1:])])
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images.float(), columns)).save(path)
    return path


BYTE_VOCAB = 256  # tokens that are the bytes of UTF-8 text (`gentrain data pack` of a .txt)


def token_text(tokens: torch.Tensor, vocab_size: int, merges=()) -> str:
    """Token samples [N, T] as one text: byte tokens, or BPE tokens through their `merges`,
    decoded as UTF-8 (undecodable bytes as U+FFFD), other vocabularies as space-separated
    ids; each sample under a header line."""
    if tokens.dim() != 2:
        raise ValueError(f"expected token samples [N, T], got shape {tuple(tokens.shape)}")
    bpe = None
    if merges:
        from gentrain.data.bpe import Bpe

        bpe = Bpe(list(merges))
    parts = []
    for number, row in enumerate(tokens.tolist()):
        if bpe is not None and vocab_size == bpe.vocab_size:
            body = bpe.decode(row, errors="replace")
        elif vocab_size == BYTE_VOCAB:
            body = bytes(row).decode("utf-8", errors="replace")
        else:
            body = " ".join(map(str, row))
        parts.append(f"===== sample {number} =====\n{body}\n")
    return "\n".join(parts)


def save_samples(samples: torch.Tensor, path: str | Path, data_info=None) -> Path:
    """Images as a grid PNG at `path`; token samples (data kind "tokens") as text at `path`
    with the suffix .txt."""
    path = Path(path)
    if data_info is not None and data_info.kind == "tokens":
        path = path.with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = token_text(samples.cpu(), data_info.vocab_size, getattr(data_info, "merges", ()))
        path.write_text(text, encoding="utf-8")
        return path
    return save_image_grid(samples, path)
