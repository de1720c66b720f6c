"""The diffusion family's process mathematics, against independent computations: q(x_t | x_0)
by Monte Carlo, the posterior q(x_s | x_t, x_0) by Gaussian conditioning of the forward
chain's joint (built step by step in float64), schedule identities and the prediction
conversions.

    .venv/bin/python -m pytest -q tests/unit/test_diffusion_process.py
"""

import math

import pytest
import torch

from gentrain_jobs.diffusion import schedules as S


def _schedules(steps=50):
    return {"linear": S.Schedule(S.linear_betas(steps)), "cosine": S.Schedule(S.cosine_betas(steps))}


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_moments_match_the_closed_form_by_monte_carlo(name):
    schedule = _schedules()[name]
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([0.7, -0.3, 1.0], dtype=torch.float64)
    for t in (0, 10, 25, 49):
        noise = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        x_t = S.q_sample(x0.expand(n, 3), torch.full((n,), t), noise, schedule.alpha_bar)
        # the closed form written out from the betas, not from alpha_bar
        keep = math.prod(1 - float(b) for b in schedule.betas[:t + 1])
        mean, var = math.sqrt(keep) * x0, 1 - keep
        stderr_mean = math.sqrt(var / n)
        assert torch.all((x_t.mean(0) - mean).abs() < 5 * stderr_mean)
        stderr_var = var * math.sqrt(2 / n)
        assert torch.all((x_t.var(0) - var).abs() < 5 * stderr_var)


def _forward_chain_joint(betas: torch.Tensor, s: int, t: int):
    """(x_s, x_t) given x_0 = 1 as a linear map of (x_0, the per-step noises), by running the
    chain x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) e_k from the data: rows of A give each
    variable's coefficients on (x_0, e_0, ..., e_t). s = -1 is the data itself."""
    width = 2 + t
    row = torch.zeros(width, dtype=torch.float64)
    row[0] = 1.0
    rows = {-1: row.clone()}
    for k in range(t + 1):
        row = row * math.sqrt(1 - float(betas[k]))
        row[1 + k] = math.sqrt(float(betas[k]))
        rows[k] = row.clone()
    return rows[s], rows[t]


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("s,t", [(-1, 0), (0, 1), (4, 5), (19, 20), (48, 49), (9, 29), (-1, 19)])
def test_posterior_mean_and_variance_are_gaussian_conditioning_of_the_chain(name, s, t):
    schedule = _schedules()[name]
    row_s, row_t = _forward_chain_joint(schedule.betas, s, t)
    noise_s, noise_t = row_s[1:], row_t[1:]
    var_s, var_t, cov = noise_s @ noise_s, noise_t @ noise_t, noise_s @ noise_t
    # E[x_s | x_t, x_0] = m_s + cov/var_t (x_t - m_t), with m = row[0] x_0
    want_xt = cov / var_t
    want_x0 = row_s[0] - want_xt * row_t[0]
    want_var = var_s - cov ** 2 / var_t
    ab = schedule.alpha_bar
    ab_s = ab[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
    coef_x0, coef_xt, variance, _ = S.posterior_terms(ab[t:t + 1], ab_s.reshape(1))
    assert float(coef_x0) == pytest.approx(float(want_x0), rel=1e-10, abs=1e-13)
    assert float(coef_xt) == pytest.approx(float(want_xt), rel=1e-10, abs=1e-13)
    assert float(variance) == pytest.approx(float(want_var), rel=1e-9, abs=1e-14)
    assert float(var_t) == pytest.approx(1 - float(ab[t]), rel=1e-12)  # alpha_bar is the chain's product
    if s == t - 1:  # the schedule's consecutive posterior is the same
        c0, ct, v, _ = schedule.posterior()
        assert float(c0[t]) == pytest.approx(float(want_x0), rel=1e-10, abs=1e-13)
        assert float(ct[t]) == pytest.approx(float(want_xt), rel=1e-10, abs=1e-13)
        assert float(v[t]) == pytest.approx(float(want_var), rel=1e-9, abs=1e-14)


def test_posterior_clipped_log_variance_and_model_variances():
    schedule = _schedules()["linear"]
    _, _, variance, log_clipped = schedule.posterior()
    assert float(variance[0]) == 0.0  # q(x_{-1} | x_0) is the data: no variance
    assert torch.allclose(log_clipped[1:], variance[1:].log())
    assert float(log_clipped[0]) == float(variance[1].log())
    small, large = schedule.model_variance("small"), schedule.model_variance("large")
    assert torch.equal(small[1:], variance[1:]) and torch.equal(large[1:], schedule.betas[1:])
    assert float(small[0]) == float(large[0]) == float(variance[1])
    assert torch.all(variance[1:] <= schedule.betas[1:])  # beta tilde <= beta


@pytest.mark.parametrize("steps", [25, 100, 1000])
def test_schedule_identities(steps):
    for name, schedule in _schedules(steps).items():
        ab = schedule.alpha_bar
        assert torch.all(ab[1:] < ab[:-1]) and 0 < float(ab[-1]) and float(ab[0]) < 1, name
        assert torch.all(schedule.betas > 0) and torch.all(schedule.betas <= 0.999), name
        assert torch.allclose(schedule.alpha_bar_prev[1:], ab[:-1]) and float(schedule.alpha_bar_prev[0]) == 1
        snr = schedule.snr
        assert torch.all(snr[1:] < snr[:-1])
        assert torch.allclose(ab, snr / (1 + snr), rtol=1e-12)  # alpha_bar = SNR / (1 + SNR)
    linear = S.linear_betas(1000)
    assert float(linear[0]) == pytest.approx(1e-4) and float(linear[-1]) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="job.config.timesteps: 10 is too few for the linear schedule"):
        S.linear_betas(10)
    stretched = S.linear_betas(steps) * steps / 1000  # improved DDPM's 1000/T scaling of the endpoints
    assert float(stretched[0]) == pytest.approx(1e-4) and float(stretched[-1]) == pytest.approx(0.02)


def test_cosine_schedule_endpoints_and_log_snr():
    steps, offset = 1000, 0.008
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    f = S.cosine_alpha_bar(u, offset)
    assert float(f[0]) == pytest.approx(1.0, abs=1e-15) and float(f[-1]) == pytest.approx(0.0, abs=1e-15)
    betas = S.cosine_betas(steps)
    assert float(betas[-1]) == 0.999  # the clip: unclipped it would be 1 (alpha_bar(1) = 0)
    assert float(betas[0]) < 1e-4  # nearly noiseless first step
    # Away from the clipped end, alpha_bar is the closed form, and log SNR = -2 log tan(pi/2 (u+s)/(1+s))
    # up to f(0)'s normalisation.
    ab = S.alphas_cumprod(betas)
    u = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    closed = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2 / math.cos(offset / (1 + offset) * math.pi / 2) ** 2
    assert torch.allclose(ab[:900], closed[:900], rtol=1e-9)
    log_snr = S.signal_to_noise(ab[:900]).log()
    angle = (u[:900] + offset) / (1 + offset) * math.pi / 2
    want = (closed[:900] / (1 - closed[:900])).log()
    assert torch.allclose(log_snr, want, rtol=1e-8)
    assert torch.allclose(S.signal_to_noise(torch.cos(angle) ** 2).log(), -2 * torch.tan(angle).log(), rtol=1e-10)


def test_eps_x0_v_conversions_round_trip_exactly():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    a = torch.rand(64, 1, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = S.v_from(x0, eps, a)
    for got, want in [(S.x0_from_eps(x_t, eps, a), x0), (S.eps_from_x0(x_t, x0, a), eps),
                      (S.eps_from_v(x_t, v, a), eps), (S.x0_from_v(x_t, v, a), x0),
                      (S.to_eps("x0", x0, x_t, a), eps), (S.to_eps("v", v, x_t, a), eps),
                      (S.to_eps("eps", eps, x_t, a), eps)]:
        assert torch.allclose(got, want, atol=1e-12)
    # v is x_t rotated: (x_t, v) = R(phi) (x0, eps) with cos phi = sqrt(ab), so norms are kept
    assert torch.allclose(x_t ** 2 + v ** 2, x0 ** 2 + eps ** 2, atol=1e-12)
    for target in ("eps", "x0", "v"):
        assert torch.allclose(S.to_eps(target, S.training_target(target, x0, eps, a), x_t, a), eps, atol=1e-12)
    with pytest.raises(ValueError, match="job.config.target"):
        S.to_eps("score", eps, x_t, a)
