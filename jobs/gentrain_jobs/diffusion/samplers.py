"""Samplers sharing one noise predictor eps(x_t, t) (t: 0-based step indices [B]).

- ddpm: ancestral sampling, x_s ~ N(posterior mean with x0_hat, a fixed variance) (Ho et al.);
- ddim: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps + sigma z, sigma^2 = eta^2 times
  the posterior variance (Song et al. 2021a); eta = 1 is DDPM's small-variance step;
- pc: the reverse SDE's reverse-diffusion predictor with Langevin corrector steps whose
  size follows the signal-to-noise ratio `snr` (Song et al. 2021b, Algorithms 2-5), for the
  VP SDE (in x) or the VE SDE (in y = x/sqrt(ab), sigma = sqrt((1-ab)/ab): any schedule is a
  VE process in y; schedules.ve_betas trains on geometric sigmas);
- ode: the probability flow ODE, dy/dsigma = eps, in y = x/sqrt(ab), sigma = sqrt((1-ab)/ab),
  by Heun's method with Euler's first and last steps (Euler's method throughout is DDIM with
  eta = 0; Karras et al. 2022).

A shorter run uses `steps` evenly spaced indices of the T trained ones; a step from index t
to s < t uses the pair's own beta, 1 - ab_t/ab_s (the respacing of improved DDPM).
`known`/`mask` inpaint: after every step the known pixels are replaced by a fresh draw of
q(x_s | known) (RePaint's replacement), the data itself at the end; with `resample` U > 1
each step is repeated U - 1 more times after going back up to t by q(x_t | x_s) (RePaint's
resampling, jump length 1: it lets the free pixels agree with the known ones, which plain
replacement only approximates).
"""

from __future__ import annotations

from typing import Callable

import torch

from gentrain_jobs.diffusion import schedules as S

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim", "pc", "ode")


def timesteps(total: int, steps: int) -> list[int]:
    """`steps` indices evenly spread over 0..total-1, first and last included, descending."""
    steps = max(1, min(steps, total))
    chosen = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long().unique()
    return chosen.flip(0).tolist()


def ddpm_step(x, eps, ab_t, ab_s, variance: str = "small", clip: float | None = None):
    """Mean and variance of p(x_s | x_t): the posterior q(x_s | x_t, x0_hat) with the model's
    fixed variance ("small": the posterior's, "large": the step's beta; 0 into the data)."""
    x0 = S.x0_from_eps(x, eps, ab_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    coef_x0, coef_xt, posterior_var, _ = S.posterior_terms(ab_t, ab_s)
    mean = coef_x0 * x0 + coef_xt * x
    var = posterior_var if variance == "small" else 1 - ab_t / ab_s
    return mean, torch.where(ab_s >= 1, torch.zeros_like(var), var)


def ddim_step(x, eps, ab_t, ab_s, eta: float, clip: float | None = None):
    """Mean and variance of DDIM's generalized step from t to s."""
    x0 = S.x0_from_eps(x, eps, ab_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = S.eps_from_x0(x, x0, ab_t)
    var = eta ** 2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    mean = ab_s.sqrt() * x0 + (1 - ab_s - var).clamp(min=0).sqrt() * eps
    return mean, var


def _noise(x, generator, temperature=1.0):
    return temperature * torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def _alpha_bar(alpha_bar: torch.Tensor, index: int, like: torch.Tensor) -> torch.Tensor:
    value = alpha_bar[index] if index >= 0 else alpha_bar.new_ones(())
    return value.to(like.device, like.dtype).reshape([1] * like.dim())


def _langevin(eps_fn, x, t_batch, ab_t, alpha_t, snr, generator, temperature):
    """One Langevin corrector step at noise level t, step size 2 alpha (snr |z| / |score|)^2
    with the norms averaged over the batch (Song et al.'s reference code): one step size for
    every sample, since a size that depends on each sample's own position would break the
    chain's detailed balance (samples near a mode, with small scores, would be flung out)."""
    score = -eps_fn(x, t_batch) / (1 - ab_t).sqrt()
    z = _noise(x, generator, temperature)
    ratio = snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
    step = 2 * alpha_t * ratio ** 2
    return x + step * score + (2 * step).sqrt() * z


def _ve_pc_step(eps_fn, x, t_batch, ab_t, ab_s, last, snr, corrector_steps, generator, temperature):
    """Langevin corrector steps and the reverse-diffusion predictor of the VE SDE, in y."""
    sigma_t, sigma_s = ((1 - ab_t) / ab_t).sqrt(), ((1 - ab_s) / ab_s).sqrt()
    y = x / ab_t.sqrt()
    for _ in range(corrector_steps):  # Algorithm 4: step 2 (snr |z| / |score|)^2
        score = -eps_fn(y * ab_t.sqrt(), t_batch) / sigma_t
        z = _noise(y, generator, temperature)
        ratio = snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
        step = 2 * ratio ** 2
        y = y + step * score + (2 * step).sqrt() * z
    score = -eps_fn(y * ab_t.sqrt(), t_batch) / sigma_t
    jump = sigma_t ** 2 - sigma_s ** 2  # Algorithm 2's predictor: y + jump score + sqrt(jump) z
    y = y + jump * score
    if not last:
        y = y + jump.sqrt() * _noise(y, generator, temperature)
    return y * ab_s.sqrt()


def sample(eps_fn: EpsFn, alpha_bar: torch.Tensor, shape, generator: torch.Generator, *, sampler: str = "ddpm",
           sde: str = "vp", steps: int | None = None, eta: float = 0.0, variance: str = "small", snr: float = 0.16,
           corrector_steps: int = 1, solver: str = "heun", temperature: float = 1.0, clip: float | None = None,
           device=None, dtype=torch.float32, known: torch.Tensor | None = None,
           mask: torch.Tensor | None = None, resample: int = 1) -> torch.Tensor:
    """Draw [shape] from noise with `sampler`; alpha_bar: the trained schedule's [T] (float64)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"job.sampling.sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if sde not in ("vp", "ve"):
        raise ValueError(f"job.sampling.sde: {sde!r} is not one of vp, ve")
    total = len(alpha_bar)
    indices = timesteps(total, steps or total)
    x = _noise(torch.empty(shape, device=device, dtype=dtype), generator, temperature)

    def replace_known(x, index):
        if known is None:
            return x
        a = _alpha_bar(alpha_bar, index, x)
        noisy = a.sqrt() * known + (1 - a).sqrt() * _noise(x, generator) if index >= 0 else known
        return mask * noisy + (1 - mask) * x

    def _step(x, t_batch, s, position, ab_t, ab_s):
        if sampler == "pc" and sde == "ve":
            return _ve_pc_step(eps_fn, x, t_batch, ab_t, ab_s, s < 0, snr, corrector_steps, generator, temperature)
        if sampler == "pc":
            alpha_t = ab_t / ab_s
            for _ in range(corrector_steps):
                x = _langevin(eps_fn, x, t_batch, ab_t, alpha_t, snr, generator, temperature)
            beta = 1 - alpha_t
            score = -eps_fn(x, t_batch) / (1 - ab_t).sqrt()
            mean = (2 - alpha_t.sqrt()) * x + beta * score
            return mean + beta.sqrt() * _noise(x, generator, temperature) if s >= 0 else mean
        if sampler == "ode":
            # Euler on the first step (out of sigma_max, where y - mu grows like sigma and
            # Euler is exact in the limit, while Heun's correction is multiplied by
            # sigma_t/sigma_s: the cosine schedule's clipped last step has sigma ~ 8000) and on
            # the last (into sigma = 0), Heun between.
            return _ode_step(eps_fn, x, t_batch, s, ab_t, ab_s, "euler" if position == 0 else solver)
        eps = eps_fn(x, t_batch)
        if sampler == "ddpm":
            mean, var = ddpm_step(x, eps, ab_t, ab_s, variance, clip)
        else:
            mean, var = ddim_step(x, eps, ab_t, ab_s, eta, clip)
        return mean + var.sqrt() * _noise(x, generator, temperature) if s >= 0 else mean

    x = replace_known(x, indices[0])
    for position, t in enumerate(indices):
        s = indices[position + 1] if position + 1 < len(indices) else -1
        ab_t, ab_s = _alpha_bar(alpha_bar, t, x), _alpha_bar(alpha_bar, s, x)
        t_batch = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
        for again in range(resample if known is not None and s >= 0 else 1):
            if again:  # RePaint: back up to t by the forward process, then the step once more
                x = (ab_t / ab_s).sqrt() * x + (1 - ab_t / ab_s).sqrt() * _noise(x, generator)
            x = replace_known(_step(x, t_batch, s, position, ab_t, ab_s), s)
    return x


def _ode_step(eps_fn, x, t_batch, s, ab_t, ab_s, solver):
    sigma_t, sigma_s = ((1 - ab_t) / ab_t).sqrt(), ((1 - ab_s) / ab_s).sqrt()
    eps = eps_fn(x, t_batch)
    y = x / ab_t.sqrt() + (sigma_s - sigma_t) * eps  # Euler
    if solver == "heun" and s >= 0:
        eps_next = eps_fn(y * ab_s.sqrt(), torch.full_like(t_batch, s))
        y = x / ab_t.sqrt() + (sigma_s - sigma_t) * (eps + eps_next) / 2
    elif solver not in ("heun", "euler"):
        raise ValueError(f"job.sampling.solver: {solver!r} is not one of heun, euler")
    return y * ab_s.sqrt()


def network_evaluations(sampler: str, steps: int, corrector_steps: int = 1, solver: str = "heun") -> int:
    """Calls of the network per sample (a guided call counts once; it runs two halves of a batch)."""
    if sampler == "pc":
        return steps * (1 + corrector_steps)
    if sampler == "ode" and solver == "heun":
        return max(2 * steps - 2, steps)
    return steps
