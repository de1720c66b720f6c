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
    # Plain replacement only approximates the conditional N(1.5, 0.09) (its mean is reached
    # about three quarters of the way: 1.13 measured); it must at least move the free
    # coordinate well away from its unconditional mean 0 toward 1.5.
    plain = float(x[:, 1].mean())
    assert 0.75 < plain < 1.6
    # RePaint's resampling (U = 10) brings it to the conditional: mean within 0.05 of 1.5
    # (1.47 measured; standard error 0.005) and its spread near 0.3.
    x = samplers.sample(eps_fn, alpha_bar, (n, 2), torch.Generator().manual_seed(0), sampler="ddpm",
                        dtype=torch.float64, known=known, mask=mask, resample=10)
    assert torch.equal(x[:, 0], known[:, 0])
    print(f"free coordinate's mean: plain {plain:.3f}, resampled {float(x[:, 1].mean()):.3f}, std {float(x[:, 1].std()):.3f}")
    assert abs(float(x[:, 1].mean()) - 1.5) < 0.05 and abs(float(x[:, 1].mean()) - 1.5) < abs(plain - 1.5) / 3
    assert 0.25 < float(x[:, 1].std()) < 0.36


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


def test_the_decoder_term_is_summed_not_drawn_which_keeps_the_estimate_tight():
    """On 8-bit data the decoder term L_0 dwarfs each KL term; drawn with probability 1/T (T/K
    times K uniform terms over every t) it made most of the estimate's variance. Summed for
    every sample, with the KLs drawn from t = 1 .. T-1, the estimate stays unbiased and its
    spread falls several-fold."""
    schedule = S.Schedule(S.linear_betas(200))  # T and K of diffusion/debug
    generator = torch.Generator().manual_seed(6)
    x0 = ((MU + STD * torch.randn(3000, 4, generator=generator, dtype=torch.float64)).clamp(-1, 1) * 127.5
          ).round() / 127.5  # on the 256 levels of [-1, 1]
    eps_fn = gaussian_eps(schedule.alpha_bar)  # as a trained model: small KLs, L_0 the bulk
    full = B.variational_bound(eps_fn, x0, schedule, torch.Generator().manual_seed(7))["total"]
    ours = B.variational_bound(eps_fn, x0, schedule, torch.Generator().manual_seed(8), timesteps=16)["total"]
    uniform = B.prior_kl(x0, schedule) + 200 / 16 * sum(
        B.terms_at(eps_fn, x0, torch.randint(0, 200, (len(x0),), generator=generator),
                   torch.randn(x0.shape, generator=generator, dtype=torch.float64), schedule, "small", True)
        for _ in range(16))
    for estimate in (ours, uniform):
        stderr = math.sqrt(float(full.var() + estimate.var()) / len(x0))
        assert abs(float(full.mean() - estimate.mean())) < 5 * stderr
    # measured 259 against 956 here; on diffusion/debug's trained model, sd 0.11 against 0.51 bits/dim
    assert float(ours.var()) < 0.5 * float(uniform.var()), (float(ours.var()), float(uniform.var()))


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


# -- the VE process and the probability flow ODE's likelihood ------------------------------
def test_ve_schedule_is_the_scaled_variance_exploding_process():
    """schedule ve: the chain's alpha_bar is 1/(1 + sigma^2) for geometric sigmas, so x_t scaled
    by 1/sqrt(ab_t) is x_0 + sigma_t eps exactly."""
    sigmas = S.ve_sigmas(50, 0.01, 50.0)
    assert float(sigmas[0]) == pytest.approx(0.01) and float(sigmas[-1]) == pytest.approx(50.0)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)
    schedule = S.Schedule(S.make_betas("ve", 50, 0.01, 50.0))
    assert torch.allclose(schedule.alpha_bar, 1 / (1 + sigmas ** 2), rtol=1e-12)
    assert torch.allclose(S.sigmas_of(schedule.alpha_bar), sigmas, rtol=1e-10)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 3, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator,
                                                                                        dtype=torch.float64)
    t = torch.arange(8) * 7
    x_t = S.q_sample(x0, t, noise, schedule.alpha_bar)
    a = S.gather(schedule.alpha_bar, t, x0)
    assert torch.allclose(x_t / a.sqrt(), x0 + S.gather(sigmas, t, x0) * noise, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="job.config.sigma_min .* sigma_max"):
        S.ve_sigmas(10, 5.0, 1.0)


@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_ve_predictor_corrector_draws_the_gaussian_of_its_exact_predictor(corrector_steps):
    alpha_bar = S.Schedule(S.make_betas("ve", 400, 0.01, 50.0)).alpha_bar
    x = samplers.sample(gaussian_eps(alpha_bar), alpha_bar, (10_000, 4), torch.Generator().manual_seed(0),
                        dtype=torch.float64, sampler="pc", sde="ve", steps=200, corrector_steps=corrector_steps)
    mean, std = x.mean(0), x.std(0)
    assert torch.all((mean - MU).abs() < 0.04), mean
    assert torch.all((std / STD - 1).abs() < 0.05), std


@pytest.mark.parametrize("schedule", ["linear", "cosine", "ve"])
def test_ode_likelihood_of_the_exact_predictor_is_its_flows_density(schedule):
    """Gaussian data: the exact predictor's flow is linear, y_T - mu = (y - mu) sqrt(v_T / v_0)
    per dimension with v = s^2 + sigma^2, so the model's density is the prior at y_T times
    that Jacobian, in closed form; Heun converges to it at second order. It is close to the
    data's own density at the first level, N(mu, s^2 + sigma_0^2), but not equal: the prior
    is centred at 0, not mu (0.1 nats at most here for sigma_T = 50)."""
    from gentrain_jobs.diffusion.likelihood import ode_log_likelihood

    alpha_bar = S.Schedule(S.make_betas(schedule, 400)).alpha_bar
    sigmas = S.sigmas_of(alpha_bar)
    x = MU + STD * torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v0, v_top = STD ** 2 + sigmas[0] ** 2, STD ** 2 + sigmas[-1] ** 2
    y_top = MU + (x - MU) * (v_top / v0).sqrt()
    flow = (torch.distributions.Normal(0.0, float((1 + sigmas[-1] ** 2).sqrt())).log_prob(y_top).sum(1)
            + 0.5 * torch.log(v_top / v0).sum())
    errors = {}
    for steps, solver in [(100, "heun"), (200, "heun"), (200, "euler")]:
        got = ode_log_likelihood(gaussian_eps(alpha_bar), x, alpha_bar, steps=steps, divergence="exact",
                                 solver=solver)["log_p"]
        errors[steps, solver] = float((got - flow).abs().max())
    assert errors[200, "heun"] < 0.01, errors  # 0.0065, 0.0021, 0.0024 (linear, cosine, ve) measured
    assert errors[100, "heun"] > 3 * errors[200, "heun"], errors  # second order: about 4x
    assert errors[200, "euler"] > 10 * errors[200, "heun"], errors
    truth = torch.distributions.Normal(MU, v0.sqrt()).log_prob(x).sum(1)
    assert float((flow - truth).abs().max()) < 0.15


def test_hutchinson_divergence_is_unbiased_and_exact_divergence_is_the_jacobians_trace():
    from gentrain_jobs.diffusion.likelihood import ode_log_likelihood

    alpha_bar = S.Schedule(S.linear_betas(100)).alpha_bar
    weights = torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def eps_fn(x, t):  # a nonlinear field with a non-diagonal Jacobian
        return torch.tanh(x @ weights) * S.gather(alpha_bar, t, x)

    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64).expand(4000, 4)
    exact = ode_log_likelihood(eps_fn, x[:1], alpha_bar, steps=20, divergence="exact")["integral"]
    estimates = ode_log_likelihood(eps_fn, x, alpha_bar, steps=20, probes=1,
                                   generator=torch.Generator().manual_seed(9))["integral"]
    stderr = float(estimates.std()) / math.sqrt(len(estimates))
    assert float(estimates.std()) > 0  # one Rademacher probe per sample: the estimates differ
    assert abs(float(estimates.mean() - exact[0])) < 4 * stderr
    # the exact divergence is the trace of the autograd Jacobian
    from gentrain_jobs.diffusion.likelihood import _divergence
    y, t = torch.randn(3, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64), torch.full((3,), 50)
    _, div = _divergence(eps_fn, y, t, torch.tensor(1.0, dtype=torch.float64), None)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: eps_fn(v[None], t[:1])[0], y[i])
        assert float(div[i]) == pytest.approx(float(torch.trace(jacobian)), rel=1e-10)


def test_dequantized_bits_per_dim_of_the_uniform_density_is_eight():
    """Uniform dequantization by hand: k/255 goes into the k-th of 256 bins of [-1, 1], and the
    uniform density on [-1, 1]^D (log p = -D log 2) is 8 bits/dim, the 256 levels' uniform."""
    from gentrain_jobs.diffusion.likelihood import dequantization_nats, dequantize

    levels = torch.arange(256, dtype=torch.float64)
    x = dequantize((levels / 255).reshape(1, 256), torch.Generator().manual_seed(0))[0]
    assert torch.all(x >= levels / 128 - 1) and torch.all(x < (levels + 1) / 128 - 1)
    dims = 3 * 32 * 32
    nll = dims * math.log(2) + dequantization_nats(dims)
    assert nll / (dims * math.log(2)) == pytest.approx(8.0)
