"""Ancestral sampling of a directed model over categorical variables: x_1 ~ p(x_1), then
x_i ~ p(x_i | x_<i), in order.

    from gentrain.samplers import ancestral
    sequences = ancestral(next_probabilities, prefix, steps=20, generator=generator)

`next_probabilities(sequence [n, L]) -> [n, K]` is the model's distribution of the next
variable given everything drawn so far (an autoregressive network's softmax, after any
temperature/top-k/top-p filtering); it may keep state between calls, such as a key/value
cache, since it is called once per step with the sequence grown by one. Each draw is one
uniform number per sequence from the CPU generator, turned into a category by the inverse
CDF (`inverse_cdf`), so a seed gives the same sequences on any device and whether or not a
model caches.
"""

from __future__ import annotations

from typing import Callable

import torch


def inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Categories [B] from probabilities [B, K] (each row summing to one, up to rounding) and
    uniforms [B] in [0, 1): the first category whose cumulative probability exceeds u times
    the row's total. A category of zero probability is never drawn."""
    cdf = probabilities.double().cumsum(-1)
    scaled = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    categories = torch.searchsorted(cdf, scaled, right=True).squeeze(-1)
    # u * total can round onto the last cumulative value: take the last category with mass.
    last = (probabilities > 0).cumsum(-1).argmax(-1)
    return torch.minimum(categories, last)


@torch.no_grad()
def ancestral(next_probabilities: Callable[[torch.Tensor], torch.Tensor], prefix: torch.Tensor, steps: int,
              generator: torch.Generator) -> torch.Tensor:
    """`prefix` [n, P] (int64; P may be 0) followed by `steps` drawn variables: [n, P + steps]
    on the prefix's device."""
    sequence = prefix
    for _ in range(steps):
        probabilities = next_probabilities(sequence).cpu()
        uniforms = torch.rand(len(sequence), generator=generator, dtype=torch.float64)
        drawn = inverse_cdf(probabilities, uniforms).to(sequence.device)[:, None]
        sequence = torch.cat([sequence, drawn], dim=1)
    return sequence
