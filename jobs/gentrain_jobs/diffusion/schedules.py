"""The Gaussian diffusion process as pure functions (Ho et al. 2020; Nichol & Dhariwal 2021).

Timesteps are 0-based: index t in 0..T-1 is the paper's t+1, so x at index t is
    x_t = sqrt(alpha_bar[t]) x_0 + sqrt(1 - alpha_bar[t]) eps,   alpha_bar[t] = prod_{s<=t} (1 - beta[s]),
and "x_{-1}" is the data itself. Everything here is float64 (the schedules' small
differences of numbers near 1 lose digits in float32); `gather` casts to the data's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def linear_betas(steps: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear schedule, defined for T=1000 and stretched to `steps` so the total
    noise is the same at any T (improved DDPM: start and end scaled by 1000/T)."""
    scale = 1000.0 / steps
    if scale * end > 0.999:
        raise ValueError(f"job.config.timesteps: {steps} is too few for the linear schedule (its last beta "
                         f"would be {scale * end:.3g} >= 1); use at least {math.ceil(1000 * end / 0.999)} or "
                         "schedule: cosine")
    return torch.linspace(scale * start, scale * end, steps, dtype=torch.float64)


def cosine_alpha_bar(u: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's f(t)/f(0), f(u) = cos^2(((u + s)/(1 + s)) pi/2), u = t/T in [0, 1]."""
    f = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    return f / math.cos(offset / (1 + offset) * math.pi / 2) ** 2


def cosine_betas(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at max_beta (0.999: alpha_bar(T)
    is 0 exactly, and without the clip the last step would be a singular beta of 1)."""
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    alpha_bar = cosine_alpha_bar(u, offset)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def ve_sigmas(steps: int, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    """The variance-exploding process's noise levels (Song & Ermon 2019; Song et al. 2021):
    geometric from sigma_min (index 0) to sigma_max (index T-1)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"job.config.sigma_min ({sigma_min}) and sigma_max ({sigma_max}) must satisfy "
                         "0 < sigma_min < sigma_max")
    return torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), steps, dtype=torch.float64))


def ve_betas(steps: int, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    """The VE process x0 + sigma_t z as betas of the variance-preserving chain it is a scaling
    of: x_t = x_ve / sqrt(1 + sigma_t^2) has alpha_bar_t = 1 / (1 + sigma_t^2), so one network,
    loss, bound and set of samplers serve both (the network sees x_ve scaled to unit variance,
    Karras et al.'s c_in). beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, alpha_bar_{-1} = 1."""
    alpha_bar = 1 / (1 + ve_sigmas(steps, sigma_min, sigma_max) ** 2)
    previous = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1 - alpha_bar / previous


def sigmas_of(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The VE noise level of each step of a VP chain: sigma_t = sqrt((1 - ab_t) / ab_t)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def make_betas(name: str, steps: int, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    if name == "linear":
        return linear_betas(steps)
    if name == "cosine":
        return cosine_betas(steps)
    if name == "ve":
        return ve_betas(steps, sigma_min, sigma_max)
    raise ValueError(f"job.config.schedule: {name!r} is not one of linear, cosine, ve")


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast over `like` [B, ...], in its dtype/device."""
    out = values.to(like.device)[t.to(like.device)]
    return out.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Schedule:
    """The coefficients of one beta schedule, all [T] float64."""

    betas: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alpha_bar(self) -> torch.Tensor:
        return alphas_cumprod(self.betas)

    @property
    def alpha_bar_prev(self) -> torch.Tensor:
        """alpha_bar at index t-1 (1 before the first step: x_{-1} is the data)."""
        return torch.cat([self.betas.new_ones(1), self.alpha_bar[:-1]])

    @property
    def snr(self) -> torch.Tensor:
        return signal_to_noise(self.alpha_bar)

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0): (coefficient of x_0, coefficient of x_t, variance, clipped
        log variance), each [T]; see posterior_terms."""
        return posterior_terms(self.alpha_bar, self.alpha_bar_prev)

    def model_variance(self, kind: str) -> torch.Tensor:
        """The reverse process's fixed variances: "small" the posterior's (beta tilde),
        "large" beta itself; both with index 0 set to the posterior's variance at index 1,
        so the decoder's log variance is finite (Ho et al.'s reference code)."""
        variance = self.posterior()[2]
        if kind == "large":
            variance = self.betas.clone()
        elif kind != "small":
            raise ValueError(f"job.config.variance: {kind!r} is not one of small, large")
        return torch.cat([self.posterior()[2][1:2], variance[1:]])


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas, dim=0)


def signal_to_noise(alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar / (1 - alpha_bar)


def posterior_terms(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor):
    """q(x_s | x_t, x_0) for any s < t with alpha_bar(t) = alpha_bar, alpha_bar(s) = alpha_bar_prev
    (consecutive steps, or the strided steps of a shorter sampling schedule):

        mean = c0 x_0 + ct x_t,  c0 = sqrt(ab_s) b / (1 - ab_t),  ct = sqrt(1 - b) (1 - ab_s) / (1 - ab_t),
        variance = b (1 - ab_s) / (1 - ab_t),  where b = 1 - ab_t / ab_s (the step's beta).

    The log variance is clipped: its first entry (0 when s is the data) is replaced by the
    second's."""
    beta = 1 - alpha_bar / alpha_bar_prev
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    clipped = torch.cat([variance[1:2], variance[1:]]) if len(variance) > 1 else variance
    return coef_x0, coef_xt, variance, clipped.log()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """A draw of x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), given the noise."""
    a = gather(alpha_bar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# -- what the network predicts: conversions at x_t with alpha_bar a ---------------------
def x0_from_eps(x_t, eps, a):
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t, x0, a):
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def v_from(x0, eps, a):
    """Salimans & Ho's v = sqrt(ab) eps - sqrt(1 - ab) x_0."""
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def eps_from_v(x_t, v, a):
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def x0_from_v(x_t, v, a):
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def to_eps(target: str, output, x_t, a):
    """The network's output for `target` (eps | x0 | v) as a noise prediction."""
    if target == "eps":
        return output
    if target == "x0":
        return eps_from_x0(x_t, output, a)
    if target == "v":
        return eps_from_v(x_t, output, a)
    raise ValueError(f"job.config.target: {target!r} is not one of eps, x0, v")


def training_target(target: str, x0, eps, a):
    """What the network regresses on for `target` given the data and the noise."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return v_from(x0, eps, a)
    raise ValueError(f"job.config.target: {target!r} is not one of eps, x0, v")
