"""gentrain.samplers, each against a distribution known in closed form: Gaussian moments,
exact CDFs (Kolmogorov-Smirnov), enumerated RBM marginals (chi-square), known normalisers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from gentrain.samplers import (RBMParams, annealed_importance_sampling, energy_kernel, geometric_path, hmc,
                               importance_log_likelihood, kernel, langevin, linear_betas, mala,
                               random_walk_metropolis, rbm_free_energy, rbm_gibbs)

MEAN = torch.tensor([1.0, -1.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
PRECISION = torch.linalg.inv(COV)


def gaussian_energy(x: torch.Tensor) -> torch.Tensor:
    d = x - MEAN
    return 0.5 * ((d @ PRECISION) * d).sum(-1)


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def start(n: int, d: int = 2, scale: float = 3.0, seed: int = 1) -> torch.Tensor:
    return scale * torch.randn(n, d, generator=g(seed), dtype=torch.float64)


# -- Gaussian moments -------------------------------------------------------------------------
def test_unadjusted_langevin_with_a_small_step_reaches_the_correlated_gaussian():
    chain = langevin(gaussian_energy, start(8000), steps=1500, step_size=0.01, generator=g())
    mean, cov = moments(chain.samples)
    assert torch.allclose(mean, MEAN, atol=0.05) and torch.allclose(cov, COV, atol=0.07)
    assert chain.acceptance == 1.0


def test_mala_reaches_the_correlated_gaussian_and_accepts_most_moves_at_a_moderate_step():
    chain = mala(gaussian_energy, start(8000), steps=300, step_size=0.1, generator=g())
    mean, cov = moments(chain.samples)
    assert torch.allclose(mean, MEAN, atol=0.04) and torch.allclose(cov, COV, atol=0.05)
    assert 0.5 < chain.acceptance < 1.0


def test_hmc_reaches_the_correlated_gaussian():
    # Trajectory length 1: well off the half period of the narrow direction (pi * 0.45), where a
    # fixed-length HMC maps x to about -x and mixes slowly.
    chain = hmc(gaussian_energy, start(4000), steps=150, step_size=0.2, leapfrog_steps=5, generator=g())
    mean, cov = moments(chain.samples)
    assert torch.allclose(mean, MEAN, atol=0.05) and torch.allclose(cov, COV, atol=0.07)
    assert 0.6 < chain.acceptance <= 1.0


BEND = 1.0  # banana: x ~ N(0, 1), y | x ~ N(BEND (x^2 - 1), 0.5^2)


def banana_energy(z: torch.Tensor) -> torch.Tensor:
    x, y = z[:, 0], z[:, 1]
    return 0.5 * x ** 2 + 0.5 * ((y - BEND * (x ** 2 - 1)) / 0.5) ** 2


def test_hmc_on_a_banana_matches_its_closed_form_moments():
    """E x = E y = 0, Var x = 1, Var y = 2 b^2 + 1/4, E[x^2 y] = 2 b."""
    chain = hmc(banana_energy, start(6000, scale=1.0), steps=150, step_size=0.1, leapfrog_steps=15, generator=g())
    x, y = chain.samples[:, 0], chain.samples[:, 1]
    assert abs(float(x.mean())) < 0.05 and abs(float(y.mean())) < 0.06
    assert float(x.var()) == pytest.approx(1.0, abs=0.06)
    assert float(y.var()) == pytest.approx(2 * BEND ** 2 + 0.25, abs=0.15)
    assert float((x ** 2 * y).mean()) == pytest.approx(2 * BEND, abs=0.2)


# -- exactness on a 1-D non-Gaussian target (KS against the exact CDF) -------------------------
WEIGHTS, CENTRES, SCALES = (0.3, 0.7), (-1.5, 1.0), (0.6, 0.8)


def mixture_energy(x: torch.Tensor) -> torch.Tensor:
    x = x[:, 0]
    parts = [math.log(w) - math.log(s) - 0.5 * ((x - m) / s) ** 2 for w, m, s in zip(WEIGHTS, CENTRES, SCALES)]
    return -torch.logsumexp(torch.stack(parts), 0)


def mixture_cdf(x):
    return sum(w * stats.norm.cdf(x, m, s) for w, m, s in zip(WEIGHTS, CENTRES, SCALES))


def ks_pvalue(samples: torch.Tensor) -> float:
    return stats.kstest(samples[:, 0].numpy(), mixture_cdf).pvalue


@pytest.mark.parametrize("name,run", [
    ("mala", lambda x0: mala(mixture_energy, x0, steps=400, step_size=0.4, generator=g())),
    ("rwmh", lambda x0: random_walk_metropolis(mixture_energy, x0, steps=400, step_size=1.5, generator=g())),
])
def test_metropolis_kernels_keep_a_bimodal_target_exactly(name, run):
    chain = run(start(5000, d=1, scale=2.0))
    assert ks_pvalue(chain.samples) > 0.01, name
    assert 0.2 < chain.acceptance < 1.0


def test_the_ks_test_sees_unadjusted_langevins_bias_at_the_same_large_step():
    """The histogram test has power: the same large step without the MH correction fails it."""
    chain = langevin(mixture_energy, start(5000, d=1, scale=2.0), steps=400, step_size=0.4, generator=g())
    assert ks_pvalue(chain.samples) < 1e-6


# -- Gibbs on a tiny RBM against its enumerated marginal ----------------------------------------
def tiny_rbm(visible: int, hidden: int, seed: int = 0, scale: float = 1.0) -> RBMParams:
    gen = g(seed)
    return RBMParams(scale * torch.randn(visible, hidden, generator=gen, dtype=torch.float64),
                     scale * torch.randn(visible, generator=gen, dtype=torch.float64),
                     scale * torch.randn(hidden, generator=gen, dtype=torch.float64))


def all_states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def test_block_gibbs_on_a_tiny_rbm_matches_the_enumerated_visible_marginal():
    params = tiny_rbm(4, 3)
    states = all_states(4)
    # p(v) by brute force over (v, h), independent of the free-energy formula.
    joint = torch.stack([torch.stack([v @ params.visible_bias + h @ params.hidden_bias + v @ params.weight @ h
                                      for h in all_states(3)]) for v in states])
    exact = torch.softmax(torch.logsumexp(joint, 1), 0)
    assert torch.allclose(exact, torch.softmax(-rbm_free_energy(params, states), 0))
    chain = rbm_gibbs(params, torch.zeros(20000, 4, dtype=torch.float64), steps=30, generator=g())
    index = (chain.samples * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)).sum(1).long()
    counts = torch.bincount(index, minlength=16).double()
    assert stats.chisquare(counts.numpy(), (exact * 20000).numpy()).pvalue > 0.01


# -- AIS --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,step", [("hmc", 0.3), ("mala", 0.3)])
def test_ais_log_z_of_a_gaussian_is_within_its_error_bars(name, step):
    """Base N(0, 2^2 I) (normalised); target exp(-E) with Z = 2 pi sqrt(det COV)."""
    base_energy = lambda x: 0.5 * (x ** 2).sum(-1) / 4.0  # noqa: E731
    log_z_base = math.log(2 * math.pi * 4.0)
    exact = math.log(2 * math.pi) + 0.5 * math.log(float(torch.linalg.det(COV)))
    path = geometric_path(base_energy, gaussian_energy)
    x0 = 2.0 * torch.randn(500, 2, generator=g(3), dtype=torch.float64)
    result = annealed_importance_sampling(path, energy_kernel(path, kernel(name, step, leapfrog_steps=5)),
                                          x0, linear_betas(200), log_z_base, g())
    assert 0 < result.log_z_stderr < 0.05
    assert abs(result.log_z - exact) < 3 * result.log_z_stderr + 1e-3, (result.log_z, exact, result.log_z_stderr)
    # Without annealing (two betas: plain importance sampling from the base), the error bars widen.
    plain = annealed_importance_sampling(path, lambda b, x, gen: x, x0, [0.0, 1.0], log_z_base, g())
    assert plain.log_z_stderr > result.log_z_stderr


def test_ais_refuses_a_path_that_does_not_run_from_base_to_target():
    with pytest.raises(ValueError, match="from 0.0"):
        annealed_importance_sampling(lambda b, x: x.sum(-1), lambda b, x, gen: x, torch.zeros(2, 1), [0.5, 1.0],
                                     0.0, g())


# -- importance-weighted log-likelihood ---------------------------------------------------------
def test_importance_log_likelihood_of_a_linear_gaussian_model():
    """z ~ N(0, 1), x | z ~ N(z, s^2): p(x) = N(0, 1 + s^2). The exact posterior as proposal
    gives log p(x) exactly at any k; a broad proposal gets close at large k, and k = 1 is lower."""
    s2 = 0.25
    x = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    exact = torch.tensor(stats.norm.logpdf(x.numpy(), 0, math.sqrt(1 + s2)))
    log_normal = lambda v, m, var: -0.5 * math.log(2 * math.pi * var) - 0.5 * (v - m) ** 2 / var  # noqa: E731
    log_prior = lambda z: log_normal(z, 0.0, 1.0)  # noqa: E731
    log_lik = lambda z: log_normal(x, z, s2)  # noqa: E731

    def proposal(mean, var):
        def propose(n, gen):
            z = mean + math.sqrt(var) * torch.randn(n, len(x), generator=gen, dtype=torch.float64)
            return z, log_normal(z, mean, var)
        return propose

    posterior = proposal(x / (1 + s2), s2 / (1 + s2))
    assert torch.allclose(importance_log_likelihood(posterior, log_prior, log_lik, 3, g()), exact)
    broad = proposal(torch.zeros_like(x), 4.0)
    many = importance_log_likelihood(broad, log_prior, log_lik, 20000, g(), chunk=5000)
    one = torch.stack([importance_log_likelihood(broad, log_prior, log_lik, 1, g(i)) for i in range(200)]).mean(0)
    assert torch.allclose(many, exact, atol=0.03)
    assert (one < exact - 0.1).all()
