"""Guidance combinations: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffusion.errors import UserError

if TYPE_CHECKING:  # torch stays out of the import, so the CLIs' configs load without it
    import torch

    from diffusion.schedule import NoiseSchedule


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """eps = eps_uncond + s (eps_cond - eps_uncond); s = 1 is the conditional model, no guidance."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


# The coefficient c_t in eps + gamma c_t grad: the seed's Eq. 4 (default), or Dhariwal & Nichol's Algorithm 2.
SQRT_BETA, SIGMA = "sqrt-beta", "sigma"
COEFFICIENTS = (SQRT_BETA, SIGMA)
DEFAULT_COEFFICIENT = SQRT_BETA


def guidance_coefficient(
    schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor, convention: str = DEFAULT_COEFFICIENT
) -> torch.Tensor:
    """c_t, broadcast against `like`: sqrt(beta_t) with the per-step beta_t ("sqrt-beta", the seed's Eq. 4), or
    sigma_t = sqrt(1 - alphabar_t) ("sigma", Dhariwal & Nichol 2021 Alg. 2 and diffusers' CLIP-guided pipeline).
    On SD's schedule sigma_t / sqrt(beta_t) is 1.41 at t = 1, 8.74 at t = 100 and 12.3 at t = 500."""
    if convention == SQRT_BETA:
        return schedule.beta(t, like).sqrt()
    if convention == SIGMA:
        return schedule.sigma(t, like)
    raise UserError(f"unknown guidance coefficient {convention!r}; expected one of {COEFFICIENTS}")


def classifier_guided_eps(
    eps: torch.Tensor, grad: torch.Tensor, c_t: torch.Tensor, gamma: float | torch.Tensor
) -> torch.Tensor:
    """eps + gamma c_t grad, where grad is d(loss to minimise)/d z_t and c_t = `guidance_coefficient(...)`.

    Moving eps along +grad moves the predicted x0 = (z_t - sigma_t eps) / a_t along -grad: lower loss.
    """
    return eps + gamma * c_t * grad
