"""Samplers as a library: small pure functions over an energy E(x) (density ∝ exp(-E)).

    from gentrain.samplers import mala
    chain = mala(energy, x0, steps=100, step_size=0.01, generator=torch.Generator().manual_seed(0))
    chain.samples, chain.acceptance

Every function is batched over chains (the first dimension of `x0`), takes its randomness
only from the CPU `torch.Generator` it is given (draws are moved to `x0`'s device), and
returns the final states with diagnostics (`acceptance`: the mean acceptance rate).
`energy(x)` returns one value per chain, `[B]`.

- ancestral.py: ancestral sampling of an autoregressive model (x_i ~ p(x_i | x_<i), inverse CDF);
- mcmc.py: random-walk Metropolis-Hastings, unadjusted Langevin, MALA, HMC;
- gibbs.py: block Gibbs sampling of a Bernoulli-Bernoulli RBM;
- ais.py: annealed importance sampling (log weights, log Z and its standard error);
- importance.py: the importance-weighted log-likelihood estimate of a latent-variable model.
"""

from gentrain.samplers.ancestral import ancestral, inverse_cdf
from gentrain.samplers.ais import (AISResult, annealed_importance_sampling, energy_kernel, geometric_path,
                                   linear_betas, log_mean_exp, salakhutdinov_betas)
from gentrain.samplers.gibbs import RBMParams, rbm_free_energy, rbm_gibbs
from gentrain.samplers.importance import importance_log_likelihood
from gentrain.samplers.mcmc import Chain, hmc, kernel, langevin, mala, random_walk_metropolis

__all__ = ["AISResult", "Chain", "RBMParams", "ancestral", "annealed_importance_sampling", "energy_kernel",
           "geometric_path", "hmc", "importance_log_likelihood", "inverse_cdf", "kernel", "langevin", "linear_betas", "log_mean_exp", "mala",
           "random_walk_metropolis", "rbm_free_energy", "rbm_gibbs", "salakhutdinov_betas"]
