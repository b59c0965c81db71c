"""Guidance combinations: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""

from __future__ import annotations

import torch


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """eps = eps_uncond + s (eps_cond - eps_uncond); s = 1 is the conditional model, no guidance."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def classifier_guided_eps(
    eps: torch.Tensor, grad: torch.Tensor, beta_t: torch.Tensor, gamma: float | torch.Tensor
) -> torch.Tensor:
    """eps + gamma sqrt(beta_t) grad, where grad is d(loss to minimise)/d z_t.

    Moving eps along +grad moves the predicted x0 = (z_t - sigma_t eps) / a_t along -grad: lower loss.
    """
    return eps + gamma * beta_t.sqrt() * grad
