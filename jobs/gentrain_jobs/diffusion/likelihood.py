"""log p(x) under the probability flow ODE (Song et al. 2021, Appendix D.2).

In the variance-exploding view of any schedule, y = x_t / sqrt(ab_t) and
sigma = sqrt((1 - ab_t) / ab_t), the flow shared by every noise level's marginal is
dy/dsigma = eps_hat(y, sigma) (samplers.py's "ode"), and along a solution
d log p(y(sigma)) / dsigma = -div_y eps_hat. So

    log p_0(x) = log N(y_T; 0, (1 + sigma_T^2) I) + integral_{sigma_0}^{sigma_T} div_y eps_hat dsigma,

starting at y = x at the first trained level sigma_0 (the model's density at the data
point; sigma_0 = 0.01 for the linear schedule) and ending at the prior the samplers draw
from (N(0, I) in x_T). Heun's method on the trained levels `timesteps(T, steps)` ascending:
y in sigma (as the "ode" sampler: near the top eps_hat is nearly constant along the path, so
a step that multiplies sigma by 30, the cosine schedule's last, stays accurate), and the
integral as the trapezoid in u = log sigma (sigma div_y eps_hat tends to the dimension
there; a trapezoid in sigma would be off by the ratio of the sigmas). The divergence
is exact (one backward pass per dimension; small vectors) or Hutchinson's unbiased
estimate v^T (d eps_hat / dy) v with Rademacher v, one fixed draw per trajectory (FFJORD).

Images: uniform dequantization of the 256 levels, x = (k + u) / 256 * 2 - 1, so
-log P(k) <= E_u[-log p(x)] + D log(128) nats: bits/dim = -log p / (D ln 2) + 7.
"""

from __future__ import annotations

import math

import torch

from gentrain_jobs.diffusion.samplers import EpsFn, timesteps


def _divergence(eps_fn, y, t_batch, scale, probes: list[torch.Tensor] | None):
    """(sigma eps_hat(y), sigma div_y eps_hat) at y [B, ...] (x_t = y * scale)."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        eps = eps_fn(y * scale, t_batch)
        if probes is not None:
            div = sum((torch.autograd.grad(eps, y, v, retain_graph=True)[0] * v).flatten(1).sum(1)
                      for v in probes) / len(probes)
        else:
            flat = eps.flatten(1)
            div = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
            for i in range(flat.shape[1]):
                grad = torch.autograd.grad(flat[:, i].sum(), y, retain_graph=True)[0]
                div = div + grad.flatten(1)[:, i]
    return eps.detach(), div.detach()


def ode_log_likelihood(eps_fn: EpsFn, x: torch.Tensor, alpha_bar: torch.Tensor, *, steps: int | None = None,
                       solver: str = "heun", divergence: str = "hutchinson", probes: int = 1,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """log p(x) per sample [B] in nats ("log_p"), with its prior and integral parts."""
    if divergence not in ("hutchinson", "exact"):
        raise ValueError(f"job.config.ode_divergence: {divergence!r} is not one of hutchinson, exact")
    if solver not in ("heun", "euler"):
        raise ValueError(f"job.config.ode_solver: {solver!r} is not one of heun, euler")
    total = len(alpha_bar)
    levels = timesteps(total, steps or total)[::-1]  # ascending: 0 .. T-1
    ab = alpha_bar.to(x.device, x.dtype)
    sigma = ((1 - ab) / ab).sqrt()
    shape = [1] * x.dim()
    probe_list = None
    if divergence == "hutchinson":
        probe_list = [(torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.device, x.dtype)
                      for _ in range(max(1, probes))]

    def field(y, index):
        t_batch = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        return _divergence(eps_fn, y, t_batch, ab[index].sqrt().reshape(shape), probe_list)

    y = x
    integral = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    eps, div = field(y, levels[0])
    for here, there in zip(levels[:-1], levels[1:]):
        step, u_step = sigma[there] - sigma[here], torch.log(sigma[there] / sigma[here])
        guess = y + step * eps
        eps_next, div_next = field(guess, there)
        if solver == "heun":
            y = y + step * (eps + eps_next) / 2
            integral = integral + u_step * (sigma[here] * div + sigma[there] * div_next) / 2
            eps_next, div_next = field(y, there)
        else:
            y, integral = guess, integral + u_step * sigma[here] * div
        eps, div = eps_next, div_next
    variance = 1 + sigma[levels[-1]] ** 2
    dims = x[0].numel()
    prior = -0.5 * (y.flatten(1) ** 2).sum(1) / variance - 0.5 * dims * torch.log(2 * math.pi * variance)
    return {"log_p": prior + integral, "prior": prior, "integral": integral}


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[0, 1] images holding k/255 to (k + u)/256 in [-1, 1], u ~ U[0, 1)."""
    levels = (images.double() * 255).round()
    noise = torch.rand(images.shape, generator=generator, dtype=torch.float64).to(images.device)
    return (levels + noise) / 256 * 2 - 1


def dequantization_nats(dims: int) -> float:
    """D log 128: -log P(k) <= -log p(x) + this, for x in [-1, 1] bins of width 2/256."""
    return dims * math.log(128)
