"""Held-out likelihood of a token model in the units the literature reports.

Every sample of T tokens gives T - 1 predictions (token t + 1 from tokens 1..t; the
first token of a sample is context only). Over those predictions:

- nll: mean negative log-likelihood per token, in nats;
- bits_per_byte: the same in bits (nll / ln 2) when every token is one byte of the text
  (vocabulary 256, `gentrain data pack` of a .txt); for ASCII text this is bits per character;
- perplexity: exp(nll), computed from the mean NLL over the whole held-out set (never a
  mean of per-batch perplexities, which exp's convexity would push up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BYTE_VOCAB = 256


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(token t + 1 | tokens <= t) in nats, [B, T - 1], from logits [B, T, V] of tokens [B, T]."""
    predicted = logits[:, :-1].float()
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), tokens[:, 1:].reshape(-1),
                           reduction="none").view(tokens.shape[0], -1)


def bits_per_byte(nll_nats: float) -> float:
    """Mean NLL per byte token in nats -> bits per byte."""
    return nll_nats / math.log(2)


def perplexity(nll_nats: float) -> float:
    """exp(mean NLL per token in nats)."""
    return math.exp(nll_nats)
