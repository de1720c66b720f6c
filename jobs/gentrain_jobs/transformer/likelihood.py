"""Held-out likelihood of a token model in the units the literature reports.

Every sample of T tokens gives T - 1 predictions (token t + 1 from tokens 1..t; the
first token of a sample is context only). Over those predictions:

- nll: mean negative log-likelihood per token, in nats;
- bits_per_byte: the same in bits (nll / ln 2) when every token is one byte of the text
  (vocabulary 256, `gentrain data pack` of a .txt); for ASCII text this is bits per character;
- perplexity: exp(nll), computed from the mean NLL over the whole held-out set (never a
  mean of per-batch perplexities, which exp's convexity would push up).

BPE tokens (`gentrain data pack --bpe-vocab`) stand for several bytes each, and each sample
carries the UTF-8 bytes it covers ("bytes") and those of its first token ("first_bytes").
Bits per byte is then a ratio of sums over the held-out set: the NLL in bits of every
predicted token over the bytes those tokens stand for, sum(nll) / ln 2 / sum(bytes -
first_bytes); the first token of each sample is context only, so neither its loss (there is
none) nor its bytes count. nll and perplexity stay per token. With byte tokens the same rule
gives nll / ln 2.
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
    """exp(mean NLL per token in nats); inf past float range (an untrained or broken model's
    NLL must reach the logs as a number, not end the evaluation with an OverflowError)."""
    try:
        return math.exp(nll_nats)
    except OverflowError:
        return math.inf


def predicted_bytes(batch) -> torch.Tensor:
    """UTF-8 bytes of the tokens a BPE batch predicts (every token but each sample's first), [B]."""
    return batch["bytes"] - batch["first_bytes"]


def bpe_bits_per_byte(nll_nats: torch.Tensor, batch) -> float:
    """sum of NLL [B, T - 1] in bits / bytes of the predicted tokens, over one batch."""
    return float(nll_nats.sum()) / math.log(2) / float(predicted_bytes(batch).sum())
