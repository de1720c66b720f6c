"""Drawing token sequences: temperature, top-k and top-p (nucleus) filtering, and
decoding with or without the key/value cache (the same draws either way).

Every draw is one uniform number per sequence from the request's CPU generator, turned
into a token by the inverse CDF of the filtered distribution, so a seed gives the same
tokens on any device and whether or not the cache is used.
"""

from __future__ import annotations

import torch

from gentrain.samplers.ancestral import ancestral, inverse_cdf
from gentrain_jobs.transformer.model import DecoderLM, KVCache


def filtered_probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0) -> torch.Tensor:
    """Next-token probabilities [B, V] from logits [B, V]: softmax(logits / temperature), then
    only the top_k most likely tokens (0: all; ties with the k-th are kept), then only the
    smallest set of the most likely whose probability reaches top_p (1: all), renormalised.
    Temperature 0 puts all the mass on the most likely token (the first of equals)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = logits.softmax(-1)
    if top_p < 1.0:
        ordered, order = probabilities.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
        keep_sorted = before < top_p  # the most likely token is always kept
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probabilities = probabilities * keep
        probabilities = probabilities / probabilities.sum(-1, keepdim=True)
    return probabilities


def draw(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens [B] by the inverse CDF: the first token whose cumulative probability exceeds u."""
    return inverse_cdf(probabilities, uniforms)


@torch.no_grad()
def generate(model: DecoderLM, prompt: torch.Tensor, new_tokens: int, generator: torch.Generator,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             use_cache: bool = True) -> torch.Tensor:
    """prompt [n, P] (P >= 1) followed by `new_tokens` drawn tokens: int64 [n, P + new_tokens],
    by the platform's ancestral sampler (gentrain.samplers.ancestral). With the cache, each
    step runs the network on the tokens it has not seen yet (the prompt, then one token);
    without it, on the whole sequence so far (the reference the cache must match)."""
    device = next(model.parameters()).device
    cache = KVCache() if use_cache else None
    seen = 0

    def next_probabilities(sequence: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        logits = model(sequence[:, seen:] if use_cache else sequence, cache)[:, -1]
        seen = sequence.shape[1]
        return filtered_probabilities(logits, temperature, top_k, top_p)

    return ancestral(next_probabilities, prompt.to(device), new_tokens, generator)
