"""A decoder-only transformer (GPT-2 shape): pre-norm blocks, causal self-attention through
`scaled_dot_product_attention`, a GELU MLP, learned or rotary positions, the output layer
tied to the token embedding, and a key/value cache for sampling.

    model = DecoderLM(vocab_size=256, context=128, layers=2, d_model=128, heads=4)
    logits = model(tokens)                         # [B, T, vocab]: position t predicts token t+1
    cache = KVCache(); model(prompt, cache); model(next_token, cache)   # incremental decoding
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gentrain.initialise import initialise_parameters

ROTARY_BASE = 10000.0


class KVCache:
    """Keys and values of every layer for the positions decoded so far ([B, H, length, head_dim])."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.length = 0

    def layer(self, number: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values for layer `number`; return all of them so far."""
        while len(self.keys) <= number:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[number] is not None:
            key = torch.cat([self.keys[number], key], dim=2)
            value = torch.cat([self.values[number], value], dim=2)
        self.keys[number], self.values[number] = key, value
        return key, value


def rotary_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim / 2] of the rotary angles position * base^(-2i / head_dim)."""
    inverse = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inverse[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dimension by the angles (RoFormer)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float, rotary: bool):
        super().__init__()
        self.heads, self.head_dim, self.rotary, self.dropout = heads, d_model // heads, rotary, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, number: int) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            cos, sin = rotary_tables(positions, self.head_dim, q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.layer(number, k, v)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:  # new queries after `past` cached positions: query i sees keys 0 .. past + i
            allowed = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, width)))


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)) (pre-norm, GPT-2)."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float, rotary: bool, norm: str):
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attention = Attention(d_model, heads, dropout, rotary)
        self.norm2 = make_norm(norm, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                number: int = 0) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), positions, cache, number)
        return x + self.mlp(self.norm2(x))


def make_norm(kind: str, width: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "rmsnorm":
        return nn.RMSNorm(width)
    raise ValueError(f"job.config.norm: {kind!r} is not layernorm or rmsnorm")


class DecoderLM(nn.Module):
    def __init__(self, vocab_size: int, context: int, layers: int, d_model: int, heads: int,
                 mlp_ratio: int = 4, dropout: float = 0.0, positions: str = "learned",
                 norm: str = "layernorm", tie_weights: bool = True):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"job.config.d_model {d_model} is not a multiple of heads {heads}")
        if positions not in ("learned", "rotary"):
            raise ValueError(f"job.config.positions: {positions!r} is not learned or rotary")
        self.vocab_size, self.context, self.positions = vocab_size, context, positions
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position_embed = nn.Embedding(context, d_model) if positions == "learned" else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, dropout, positions == "rotary", norm)
                                    for _ in range(layers))
        self.norm = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.embed.weight  # one parameter, owned by both modules
        self.grad_checkpointing = False
        self._initialise(layers)

    def _initialise(self, layers: int) -> None:
        """GPT-2: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 layers).
        One module at a time (`initialise_parameters`): also right when built sharded (ZeRO-3)."""

        def initialise(name: str, parameter: nn.Parameter) -> None:
            if parameter.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(parameter, 0.0, std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(parameter)

        initialise_parameters(self, initialise)

    def enable_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.grad_checkpointing = enabled

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T]; with `cache`, the tokens follow the
        cache.length positions already decoded (and their keys and values are appended)."""
        start = cache.length if cache is not None else 0
        length = tokens.shape[1]
        if start + length > self.context and self.position_embed is not None:
            raise ValueError(f"{start + length} positions exceed the learned positions' context {self.context}")
        positions = torch.arange(start, start + length, device=tokens.device)
        x = self.embed(tokens)
        if self.position_embed is not None:
            x = x + self.position_embed(positions)
        x = self.dropout(x)
        for number, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, positions, use_reentrant=False)
            else:
                x = block(x, positions, cache, number)
        if cache is not None:
            cache.length += length
        return self.head(self.norm(x))
