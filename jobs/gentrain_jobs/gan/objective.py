"""GAN objectives: pure functions of critic scores (logits), so each is tested on its own
(tests/unit/test_gan.py).

Conventions: `real_scores` and `fake_scores` are the discriminator's raw outputs, one per
sample. Discriminator losses are minimised by the critic, generator losses by the
generator; all return a scalar (mean over the batch).

    non-saturating (Goodfellow et al. 2014, the -log D(G(z)) trick):
        D: softplus(-real) + softplus(fake)        G: softplus(-fake)
    hinge (Lim & Ye 2017; SNGAN, Miyato et al. 2018):
        D: relu(1 - real) + relu(1 + fake)         G: -fake
    wasserstein (Arjovsky et al. 2017; with a gradient penalty: Gulrajani et al. 2017):
        D: fake - real                             G: -fake
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("ns", "hinge", "wgan-gp")


def discriminator_loss(kind: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    if kind == "ns":
        # softplus(-x) = -log sigmoid(x): binary cross-entropy with real = 1, fake = 0.
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    if kind == "hinge":
        return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()
    if kind == "wgan-gp":
        return fake_scores.mean() - real_scores.mean()
    raise ValueError(f"job.config.loss: {kind!r} is not one of {', '.join(LOSSES)}")


def generator_loss(kind: str, fake_scores: torch.Tensor) -> torch.Tensor:
    if kind == "ns":
        return F.softplus(-fake_scores).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake_scores.mean()
    raise ValueError(f"job.config.loss: {kind!r} is not one of {', '.join(LOSSES)}")


def interpolate(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Points uniformly on the segments between paired real and fake samples (WGAN-GP)."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    weight = torch.rand(shape, generator=generator).to(device=real.device, dtype=real.dtype)
    return weight * real + (1.0 - weight) * fake


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x critic(x)||_2 - 1)^2] over `points` (Gulrajani et al. 2017, eq. 3).

    create_graph=True: the penalty is itself differentiated w.r.t. the critic's weights.
    The gradient is taken in fp32 so a bf16 critic's input gradient does not round the norm.
    """
    points = points.detach().float().requires_grad_(True)
    scores = critic(points).float()
    (grad,) = torch.autograd.grad(scores.sum(), points, create_graph=True)
    norms = grad.float().flatten(1).norm(2, dim=1)
    return (norms - 1.0).pow(2).mean()
