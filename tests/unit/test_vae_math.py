"""The VAE's mathematics: closed-form KL, likelihoods, shapes, gradient checkpointing."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from gentrain_jobs.vae import VAEConfig, build
from gentrain.registry import DataInfo
from gentrain_jobs.vae.model import ConvVAE
from gentrain_jobs.vae.objective import elbo_terms, gaussian_kl, log_likelihood


def test_analytic_kl_matches_torch_and_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mean, log_var = torch.randn(4, 6), torch.randn(4, 6) * 0.5
    analytic = gaussian_kl(mean, log_var).sum(1)
    posterior = Independent(Normal(mean, (0.5 * log_var).exp()), 1)
    prior = Independent(Normal(torch.zeros(6), torch.ones(6)), 1)
    torch.testing.assert_close(analytic, kl_divergence(posterior, prior))
    z = posterior.sample((200_000,))
    monte_carlo = (posterior.log_prob(z) - prior.log_prob(z)).mean(0)
    torch.testing.assert_close(monte_carlo, analytic, atol=0.03, rtol=0.01)


def test_kl_is_zero_exactly_at_the_prior():
    assert float(gaussian_kl(torch.zeros(3), torch.zeros(3)).sum()) == 0.0


def test_bernoulli_likelihood_equals_torch_distribution_on_binary_data():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 4, 4)
    x = torch.randint(0, 2, (3, 1, 4, 4)).float()
    expected = Independent(Bernoulli(logits=logits), 3).log_prob(x)
    torch.testing.assert_close(log_likelihood(x, logits, "bernoulli"), expected)


def test_gaussian_likelihood_equals_torch_distribution():
    torch.manual_seed(2)
    means, x = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    log_scale = torch.tensor(-1.3)
    expected = Independent(Normal(means, log_scale.exp()), 3).log_prob(x)
    torch.testing.assert_close(log_likelihood(x, means, "gaussian", log_scale), expected)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_shapes_round_trip(shape):
    model = build(VAEConfig(latent_dim=5), DataInfo(shape))["vae"]
    decoded, mean, log_var, _ = model(torch.rand(2, *shape))
    assert decoded.shape == (2, *shape)
    assert mean.shape == log_var.shape == (2, 5)


def test_side_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 4, got 10x10"):
        ConvVAE((1, 10, 10), 4, [8, 8], "bernoulli")


def test_elbo_is_reconstruction_minus_kl_and_beta_weights_the_loss():
    torch.manual_seed(3)
    model = ConvVAE((1, 8, 8), 4, [8, 8], "bernoulli")
    x = torch.rand(5, 1, 8, 8)
    terms = elbo_terms(model, x, "bernoulli", beta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["elbo"], terms["reconstruction"] - terms["kl"])
    beta4 = elbo_terms(model, x, "bernoulli", beta=4.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(beta4["loss"], -(beta4["reconstruction"] - 4.0 * beta4["kl"]))
    assert (terms["kl"] >= 0).all()


def test_gradient_checkpointing_same_gradients_fewer_saved_bytes():
    torch.manual_seed(4)
    x = torch.rand(8, 1, 28, 28)

    def grads_and_saved_bytes(checkpointing: bool):
        torch.manual_seed(5)
        model = ConvVAE((1, 28, 28), 8, [16, 32], "bernoulli")
        model.enable_grad_checkpointing(checkpointing)
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = elbo_terms(model, x, "bernoulli", generator=torch.Generator().manual_seed(0))["loss"].mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    plain_grads, plain_bytes = grads_and_saved_bytes(False)
    ckpt_grads, ckpt_bytes = grads_and_saved_bytes(True)
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-6)
    # measured: 1.33 MB vs 1.70 MB (only the conv blocks are checkpointed)
    assert ckpt_bytes < 0.85 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_bits_per_dim_conversion():
    from gentrain_jobs.vae import evaluate

    model = ConvVAE((1, 8, 8), 4, [8, 8], "bernoulli")
    metrics = evaluate({"vae": model}, VAEConfig(latent_dim=4, channels=[8, 8], iwae_samples=0),
                       {"image": torch.rand(4, 1, 8, 8)}, torch.Generator().manual_seed(0))
    assert metrics["nelbo_bits_per_dim"] == pytest.approx(-metrics["elbo"] / (64 * math.log(2)), rel=1e-5)
