"""What a trained VAE is judged by: held-out bounds, posterior collapse, pictures, scores.

- evaluate: ELBO (beta = 1, no free bits) and the IWAE bound in nats and bits/dim, the
  number of active units and the KL of each latent dimension.
- visuals: reconstructions, latent traversals and interpolations (grids saved at every
  evaluation as samples/<name>/step-N.png).
- score: per-sample anomaly scores for `gentrain score` (lower = more typical).
"""

from __future__ import annotations

import math

import torch

from gentrain_jobs.vae.likelihoods import to_image
from gentrain_jobs.vae.objective import elbo_terms, gaussian_kl, iwae_bound

# Burda et al. 2016 call a latent dimension active when Cov_x(E_q[z_u | x]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01
# Up to this many latent dimensions each KL is logged (kl_dim/NN); wider latents log a
# summary, so an MLflow run does not grow hundreds of curves.
MAX_KL_CURVES = 64
TRAVERSAL_DIMS = 8
TRAVERSAL_STEPS = 8
INTERPOLATION_STEPS = 8
SCORE_SEED = 0


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions whose posterior mean varies across the batch [B, latent]."""
    if posterior_means.shape[0] < 2:
        return 0
    return int((posterior_means.float().var(dim=0) > threshold).sum())


def kl_per_dimension_metrics(kl_per_dim: torch.Tensor) -> dict[str, float]:
    """Batch-mean KL of each latent dimension [B, latent] -> eval metrics."""
    means = kl_per_dim.float().mean(dim=0)
    if means.numel() <= MAX_KL_CURVES:
        return {f"kl_dim/{d:02d}": float(v) for d, v in enumerate(means)}
    ordered = means.sort().values
    return {"kl_dim/min": float(ordered[0]), "kl_dim/median": float(ordered[len(ordered) // 2]),
            "kl_dim/max": float(ordered[-1]),
            "kl_dim/above_0.01_nats": float((means > 0.01).sum())}


def bits_per_dim(nats: torch.Tensor, dims: int) -> float:
    """Per-sample negative log-likelihood in nats -> bits per data dimension."""
    return float(nats.mean() / (dims * math.log(2.0)))


@torch.no_grad()
def evaluation_metrics(model, x: torch.Tensor, iwae_samples: int, iwae_chunk: int,
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """The true ELBO and the IWAE bound on a held-out batch, plus collapse monitors."""
    mean, log_var = model.encode(x)
    # Noise drawn on the CPU (where the generator lives), then moved to the model's device.
    noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    terms = elbo_terms(model, x, model.likelihood, beta=1.0, noise=noise)
    dims = x[0].numel()
    metrics = {
        "elbo": float(terms["elbo"].mean()),
        "reconstruction": float(terms["reconstruction"].mean()),
        "kl": float(terms["kl"].mean()),
        "nelbo_bits_per_dim": bits_per_dim(-terms["elbo"], dims),
        "active_units": float(active_units(mean)),
    }
    if iwae_samples > 0:
        bound = iwae_bound(model, x, iwae_samples, iwae_chunk, generator)
        metrics["iwae"] = float(bound.mean())  # K = job.config.iwae_samples
        metrics["nll_bits_per_dim"] = bits_per_dim(-bound, dims)
    metrics.update(kl_per_dimension_metrics(gaussian_kl(mean.float(), log_var.float())))
    return metrics


def _square_grid(rows: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Rows of `columns` images -> one batch whose sqrt-sided grid keeps each row a row.

    The platform lays out N images in ceil(sqrt(N)) columns; padding with blank rows up
    to `columns` rows makes that equal to `columns`.
    """
    images = torch.cat(rows)
    blanks = columns * columns - images.shape[0]
    if blanks > 0:
        images = torch.cat([images, images.new_ones(blanks, *images.shape[1:])])
    return images


def _mean_images(model, z: torch.Tensor) -> torch.Tensor:
    return to_image(model.decode(z).float(), model.likelihood)


@torch.no_grad()
def reconstructions(model, x: torch.Tensor) -> torch.Tensor:
    """Inputs and their reconstructions (from the posterior mean), interleaved.

    The pair count is chosen so ceil(sqrt(2n)) is even: each pair stays side by side.
    """
    count = next((n for n in (32, 18, 8, 2) if n <= x.shape[0]), 0)
    if count == 0:
        return x[:0]
    inputs = x[:count]
    mean, _ = model.encode(inputs)
    outputs = _mean_images(model, mean).to(inputs.dtype)
    return torch.stack([inputs, outputs], dim=1).flatten(0, 1)


@torch.no_grad()
def latent_traversals(model, x: torch.Tensor) -> torch.Tensor:
    """One row per latent dimension (the first few): that dimension swept over [-3, 3]
    with the others at the posterior mean of the first held-out image."""
    base, _ = model.encode(x[:1])
    values = torch.linspace(-3.0, 3.0, TRAVERSAL_STEPS, device=base.device)
    rows = []
    for dim in range(min(TRAVERSAL_DIMS, model.latent_dim)):
        z = base.repeat(TRAVERSAL_STEPS, 1)
        z[:, dim] = values
        rows.append(_mean_images(model, z))
    return _square_grid(rows, TRAVERSAL_STEPS)


@torch.no_grad()
def interpolations(model, x: torch.Tensor) -> torch.Tensor:
    """One row per pair of held-out images: decoded linear paths between posterior means."""
    pairs = min(INTERPOLATION_STEPS, x.shape[0] // 2)
    if pairs == 0:
        return x[:0]
    mean, _ = model.encode(x[:2 * pairs])
    weights = torch.linspace(0.0, 1.0, INTERPOLATION_STEPS, device=mean.device)[:, None]
    rows = [_mean_images(model, (1 - weights) * mean[2 * i] + weights * mean[2 * i + 1])
            for i in range(pairs)]
    return _square_grid(rows, INTERPOLATION_STEPS)


@torch.no_grad()
def anomaly_scores(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """neg_elbo (one seeded posterior sample, analytic KL) and reconstruction_error
    (squared error of the posterior-mean reconstruction, summed over pixels)."""
    mean, _ = model.encode(x)
    # Seeded noise, drawn on the CPU: the same model and data give the same scores.
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(SCORE_SEED))
    terms = elbo_terms(model, x, model.likelihood, noise=noise.to(mean.device, mean.dtype))
    recon = _mean_images(model, mean)
    return {
        "neg_elbo": -terms["elbo"],
        "reconstruction_error": (recon - x.float()).pow(2).flatten(1).sum(dim=1),
    }
