"""Block Gibbs sampling of a Bernoulli-Bernoulli restricted Boltzmann machine.

E(v, h) = -v.b - h.c - v W h, v in {0,1}^V, h in {0,1}^H, W [V, H]; p(v, h) ∝ exp(-E).
The conditionals factorise: p(h_j = 1 | v) = sigmoid(c_j + v W_j), p(v_i = 1 | h) =
sigmoid(b_i + W_i h), so each half is drawn in one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gentrain.samplers.mcmc import Chain


@dataclass
class RBMParams:
    weight: torch.Tensor         # [V, H]
    visible_bias: torch.Tensor   # [V]
    hidden_bias: torch.Tensor    # [H]

    def toward(self, base_visible_bias: torch.Tensor, beta: float) -> "RBMParams":
        """The RBM of AIS's path at inverse temperature beta (Salakhutdinov & Murray 2008):
        p_beta(v, h) ∝ exp(-(1 - beta) E_A(v, h) - beta E(v, h)), with the base A an RBM of
        visible biases only. It is again an RBM: biases and weights interpolated."""
        return RBMParams(beta * self.weight, (1 - beta) * base_visible_bias + beta * self.visible_bias,
                         beta * self.hidden_bias)


def rbm_free_energy(params: RBMParams, v: torch.Tensor) -> torch.Tensor:
    """F(v) = -log sum_h exp(-E(v, h)) = -v.b - sum_j softplus(c_j + v W_j): [B]."""
    return -(v @ params.visible_bias) - F.softplus(v @ params.weight + params.hidden_bias).sum(-1)


def _bernoulli(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(p.shape, generator=generator, dtype=torch.float32).to(p.device)
    return (u < p).to(p.dtype)


def hidden_given_visible(params: RBMParams, v: torch.Tensor, generator: torch.Generator):
    p = torch.sigmoid(v @ params.weight + params.hidden_bias)
    return _bernoulli(p, generator), p


def visible_given_hidden(params: RBMParams, h: torch.Tensor, generator: torch.Generator):
    p = torch.sigmoid(h @ params.weight.t() + params.visible_bias)
    return _bernoulli(p, generator), p


@torch.no_grad()
def rbm_gibbs(params: RBMParams, v0: torch.Tensor, steps: int, generator: torch.Generator) -> Chain:
    """`steps` sweeps v -> h -> v from visible states v0 [B, V]. Gibbs moves are always
    accepted (acceptance 1). The chain's final visible states are `samples`."""
    v = v0.detach()
    for _ in range(steps):
        h, _ = hidden_given_visible(params, v, generator)
        v, _ = visible_given_hidden(params, h, generator)
    ones = torch.ones(v.shape[0], device=v.device)
    return Chain(v, 1.0, ones)
