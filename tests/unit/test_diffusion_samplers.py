"""The diffusion samplers and the variational bound, independently of training: with the
exact noise predictor of Gaussian data (x_0 ~ N(mu, s^2) per dimension, so
E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)) every sampler must return
N(mu, s^2); DDIM with eta = 1 is DDPM's step exactly; the bound equals the expectation of
log q(x_{0:T-1} | x) - log p(x, x_{0:T-1}) over forward trajectories, and its Monte Carlo
sum over t is unbiased.

    .venv/bin/python -m pytest -q tests/unit/test_diffusion_samplers.py
"""

import math

import pytest
import torch

from gentrain_jobs.diffusion import bound as B
from gentrain_jobs.diffusion import samplers
from gentrain_jobs.diffusion import schedules as S

pytestmark = pytest.mark.usefixtures("one_thread")


MU = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
STD = torch.tensor([0.5, 0.8, 1.0, 0.3], dtype=torch.float64)


def gaussian_eps(alpha_bar: torch.Tensor, mu=MU, std=STD):
    """The exact E[eps | x_t] for x_0 ~ N(mu, diag(std^2))."""
    def eps_fn(x, t):
        a = S.gather(alpha_bar, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * std ** 2 + 1 - a)
    return eps_fn


@pytest.mark.parametrize("s,t", [(-1, 0), (0, 1), (10, 11), (3, 40), (-1, 60), (80, 99)])
def test_ddim_with_eta_one_is_the_ddpm_step(s, t):
    alpha_bar = S.Schedule(S.cosine_betas(100)).alpha_bar
    ab_t = alpha_bar[t].reshape(1, 1)
    ab_s = (alpha_bar[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)).reshape(1, 1)
    generator = torch.Generator().manual_seed(t)
    x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    ddpm_mean, ddpm_var = samplers.ddpm_step(x, eps, ab_t, ab_s, "small")
    ddim_mean, ddim_var = samplers.ddim_step(x, eps, ab_t, ab_s, eta=1.0)
    assert torch.allclose(ddim_mean, ddpm_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ddim_var, ddpm_var, rtol=1e-10, atol=1e-15)
    # and eta = 0 is deterministic, with x0_hat and eps kept: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s) eps
    mean0, var0 = samplers.ddim_step(x, eps, ab_t, ab_s, eta=0.0)
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    assert float(var0.abs().max()) == 0 and torch.allclose(mean0, ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps)


def test_timesteps_spread_evenly_and_include_both_ends():
    assert samplers.timesteps(1000, 1000) == list(range(999, -1, -1))
    assert samplers.timesteps(1000, 4) == [999, 666, 333, 0]
    assert samplers.timesteps(10, 50) == list(range(9, -1, -1))


def test_probability_flow_euler_is_ddim_with_eta_zero():
    alpha_bar = S.Schedule(S.linear_betas(200)).alpha_bar
    common = dict(shape=(64, 4), steps=20, dtype=torch.float64)
    ode = samplers.sample(gaussian_eps(alpha_bar), alpha_bar, generator=torch.Generator().manual_seed(3),
                          sampler="ode", solver="euler", **common)
    ddim = samplers.sample(gaussian_eps(alpha_bar), alpha_bar, generator=torch.Generator().manual_seed(3),
                           sampler="ddim", eta=0.0, **common)
    assert torch.allclose(ode, ddim, rtol=1e-10, atol=1e-10)


SETTINGS = {
    "ddpm-all-steps": dict(sampler="ddpm"),
    "ddpm-large-variance": dict(sampler="ddpm", variance="large"),
    "ddim-eta0-200": dict(sampler="ddim", steps=200, eta=0.0),  # first order: 50 steps are 6% narrow
    "ddim-eta1-all": dict(sampler="ddim", eta=1.0),
    "pc-100": dict(sampler="pc", steps=100, snr=0.16, corrector_steps=1),
    "ode-heun-25": dict(sampler="ode", steps=25, solver="heun"),
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_sampler_draws_the_gaussian_its_exact_predictor_belongs_to(name, schedule):
    alpha_bar = S.Schedule(S.make_betas(schedule, 400)).alpha_bar
    n = 10_000
    x = samplers.sample(gaussian_eps(alpha_bar), alpha_bar, (n, 4), torch.Generator().manual_seed(0),
                        dtype=torch.float64, **SETTINGS[name])
    mean, std = x.mean(0), x.std(0)
    # standard errors: std/sqrt(n) = 0.01 at most for the mean, 0.7% for the std; the tolerances leave room
    # for the discretisation error of a few dozen steps
    assert torch.all((mean - MU).abs() < 0.04), (name, mean)
    assert torch.all((std / STD - 1).abs() < 0.05), (name, std)


def test_inpainting_keeps_the_known_coordinates_and_conditions_the_rest():
    # Correlated 2-D Gaussian: x = (z, z + 0.3 w); knowing the first coordinate the second's
    # conditional mean is the known value. Exact eps for a full-covariance Gaussian.
    cov = torch.tensor([[1.0, 1.0], [1.0, 1.09]], dtype=torch.float64)
    alpha_bar = S.Schedule(S.linear_betas(200)).alpha_bar

    def eps_fn(x, t):
        a = S.gather(alpha_bar, t, x)[:1, 0]  # one t per batch here
        sigma = a * cov + (1 - a) * torch.eye(2, dtype=torch.float64)
        return (1 - a).sqrt() * torch.linalg.solve(sigma, x.T).T

    n = 4000
    known = torch.zeros(n, 2, dtype=torch.float64)
    known[:, 0] = 1.5
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(n, 2)
    x = samplers.sample(eps_fn, alpha_bar, (n, 2), torch.Generator().manual_seed(0), sampler="ddpm",
                        dtype=torch.float64, known=known, mask=mask)
    assert torch.equal(x[:, 0], known[:, 0])
    # Plain replacement (RePaint without its resampling) only approximates the conditional
    # (its mean, 1.5, is reached about three quarters of the way: 1.13 measured); it must at
    # least move the free coordinate well away from its unconditional mean 0 toward 1.5.
    assert 0.75 < float(x[:, 1].mean()) < 1.6


# -- the bound ------------------------------------------------------------------------
def test_discretized_gaussian_sums_to_one_over_the_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -3.0), (0.9, -5.0), (-1.2, 0.5), (0.3, -8.0), (5.0, 0.0)]:
        log_p = B.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                      torch.full_like(levels, log_scale))
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-10)
        inner = torch.distributions.Normal(mean, math.exp(log_scale)).cdf
        k = 100  # an inner bin by its CDF difference
        want = inner(levels[k] + 1 / 255) - inner(levels[k] - 1 / 255)
        assert float(log_p[k].exp()) == pytest.approx(float(want), rel=1e-6, abs=1e-300)


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.2])
    lv1, lv2 = torch.tensor([-1.0, 0.5]), torch.tensor([0.2, -0.7])
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(B.normal_kl(m1, lv1, m2, lv2), want, atol=1e-6)


def _trajectory_bound(eps_fn, x0, schedule: S.Schedule, variance: str, generator) -> torch.Tensor:
    """log q(x_{0:T-1} | x) - log p(x, x_{0:T-1}) for one forward trajectory per sample: the
    forward chain and the reverse process's Gaussians written out, vector data (density)."""
    def log_normal(x, mean, var):
        return (-0.5 * (math.log(2 * math.pi) + var.log() + (x - mean) ** 2 / var)).sum(1)

    betas, steps = schedule.betas, schedule.steps
    xs, previous = [], x0
    log_q = torch.zeros(len(x0), dtype=torch.float64)
    for k in range(steps):
        mean, var = (1 - betas[k]).sqrt() * previous, betas[k].expand_as(previous)
        nxt = mean + var.sqrt() * torch.randn(previous.shape, generator=generator, dtype=torch.float64)
        log_q = log_q + log_normal(nxt, mean, var)
        xs.append(nxt)
        previous = nxt
    log_p = log_normal(xs[-1], torch.zeros_like(x0), torch.ones_like(x0))
    model_var = schedule.model_variance(variance)
    alpha_bar = schedule.alpha_bar
    for k in range(steps - 1, -1, -1):
        t = torch.full((len(x0),), k)
        ab_k = alpha_bar[k]
        ab_prev = alpha_bar[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0_hat = (xs[k] - (1 - ab_k).sqrt() * eps_fn(xs[k], t)) / ab_k.sqrt()
        mean = (ab_prev.sqrt() * betas[k] * x0_hat + (1 - betas[k]).sqrt() * (1 - ab_prev) * xs[k]) / (1 - ab_k)
        target = xs[k - 1] if k > 0 else x0
        log_p = log_p + log_normal(target, mean, model_var[k].expand_as(x0))
    return log_q - log_p


@pytest.mark.parametrize("variance", ["small", "large"])
def test_bound_is_the_expected_log_ratio_of_the_forward_and_reverse_chains(variance):
    schedule = S.Schedule(S.cosine_betas(6))
    generator = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = (MU + STD * torch.randn(n, 4, generator=generator, dtype=torch.float64))
    eps_fn = gaussian_eps(schedule.alpha_bar, MU + 0.2, STD * 1.3)  # an imperfect model: KLs are not 0
    direct = _trajectory_bound(eps_fn, x0, schedule, variance, generator)
    ours = B.variational_bound(eps_fn, x0, schedule, generator, variance=variance, discrete=False)["total"]
    stderr = math.sqrt(float(direct.var() + ours.var()) / n)
    assert abs(float(direct.mean() - ours.mean())) < 5 * stderr
    # and both bound the true NLL of the data from above
    true_nll = -torch.distributions.Normal(MU, STD).log_prob(x0).sum(1).mean()
    assert float(ours.mean()) > float(true_nll)


def test_monte_carlo_sum_over_t_is_unbiased():
    schedule = S.Schedule(S.linear_betas(50))
    x0 = (MU + STD * torch.randn(2000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    eps_fn = gaussian_eps(schedule.alpha_bar, MU + 0.3, STD)
    full = B.variational_bound(eps_fn, x0, schedule, torch.Generator().manual_seed(2), discrete=False)["total"]
    sampled = B.variational_bound(eps_fn, x0, schedule, torch.Generator().manual_seed(3), discrete=False,
                                  timesteps=4)["total"]
    stderr = math.sqrt(float(full.var() + sampled.var()) / len(x0))
    assert abs(float(full.mean() - sampled.mean())) < 5 * stderr
    assert float(sampled.var()) > float(full.var())  # the t draws add variance, not bias


def test_bound_of_the_exact_predictor_is_above_and_near_the_true_nll():
    """A sanity check of the units and signs: with the exact predictor the small variance
    (the posterior's) loses most at small t, where the true reverse step is wider (the
    large variance, beta, is near-optimal there; Ho et al. sec. 3.2), so the large-variance
    bound is the closer one; the decoder's variance (the posterior's at index 1, half of
    beta_0) costs about 0.1 nats per dimension."""
    schedule = S.Schedule(S.linear_betas(1000))
    x0 = (MU + STD * torch.randn(2000, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    true_nll = float(-torch.distributions.Normal(MU, STD).log_prob(x0).sum(1).mean())
    bounds = {variance: float(B.variational_bound(gaussian_eps(schedule.alpha_bar), x0, schedule,
                                                  torch.Generator().manual_seed(5), discrete=False, timesteps=100,
                                                  variance=variance)["total"].mean())
              for variance in ("small", "large")}
    assert true_nll < bounds["large"] < bounds["small"]
    assert bounds["large"] < true_nll + 0.75  # 0.54 measured (4 dimensions)
