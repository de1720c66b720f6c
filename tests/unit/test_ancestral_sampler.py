"""gentrain.samplers.ancestral against a known joint distribution, and the inverse CDF.

    PYTHONPATH=platform:jobs .venv/bin/python -m pytest tests/unit/test_ancestral_sampler.py -q
"""

import itertools

import torch

from gentrain.samplers import ancestral, inverse_cdf

# A second-order chain over 3 symbols: p(x_1), p(x_2 | x_1), p(x_3 | x_1, x_2).
FIRST = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
SECOND = torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
THIRD = torch.softmax(torch.arange(27, dtype=torch.float64).reshape(3, 3, 3).sin() * 2, dim=-1)


def next_probabilities(sequence: torch.Tensor) -> torch.Tensor:
    if sequence.shape[1] == 0:
        return FIRST.expand(len(sequence), 3)
    if sequence.shape[1] == 1:
        return SECOND[sequence[:, 0]]
    return THIRD[sequence[:, 0], sequence[:, 1]]


def test_draws_the_joint_distribution_of_a_known_chain():
    n = 40_000
    drawn = ancestral(next_probabilities, torch.zeros(n, 0, dtype=torch.long), 3, torch.Generator().manual_seed(0))
    assert drawn.shape == (n, 3) and drawn.dtype == torch.long
    counts = torch.zeros(3, 3, 3, dtype=torch.float64)
    counts.index_put_(tuple(drawn.T), torch.ones(n, dtype=torch.float64), accumulate=True)
    chi_square = 0.0
    for a, b, c in itertools.product(range(3), repeat=3):
        expected = n * FIRST[a] * SECOND[a, b] * THIRD[a, b, c]
        chi_square += float((counts[a, b, c] - expected) ** 2 / expected)
    # 26 degrees of freedom: the 99.9% quantile of chi^2(26) is 54.05.
    assert chi_square < 54.05, chi_square


def test_a_prefix_is_kept_and_the_rest_is_conditioned_on_it():
    n = 20_000
    prefix = torch.tensor([[2, 0]]).expand(n, 2)
    drawn = ancestral(next_probabilities, prefix, 1, torch.Generator().manual_seed(1))
    assert torch.equal(drawn[:, :2], prefix)
    frequencies = torch.bincount(drawn[:, 2], minlength=3).double() / n
    assert torch.allclose(frequencies, THIRD[2, 0], atol=0.015), (frequencies, THIRD[2, 0])


def test_the_same_seed_gives_the_same_sequences():
    prefix = torch.zeros(64, 0, dtype=torch.long)
    first = ancestral(next_probabilities, prefix, 3, torch.Generator().manual_seed(5))
    again = ancestral(next_probabilities, prefix, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)


def test_inverse_cdf_picks_the_category_whose_interval_holds_u_and_never_one_without_mass():
    probabilities = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0]]).expand(6, 5)
    uniforms = torch.tensor([0.0, 0.19999, 0.2, 0.69999, 0.7, 1.0 - 1e-12], dtype=torch.float64)
    assert inverse_cdf(probabilities, uniforms).tolist() == [0, 0, 2, 2, 3, 3]
