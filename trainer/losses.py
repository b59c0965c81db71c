"""The distillation losses, one small pure function each: tensors in, per-sample loss out (no optimiser, no DDP).

All targets are in eps space and computed in float32 from the teacher's stored outputs; the student's eps is
its own prediction converted to eps (`diffusion.unet.unet_eps`). Reduction over the batch is the caller's.
"""

from __future__ import annotations

import torch

from diffusion.guidance import cfg_combine, classifier_guided_eps


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all but the batch dimension of (prediction - target)^2, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def cfg_distill_loss(
    eps_student: torch.Tensor, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """Feed-forward guidance, classifier-free: ||eps_student - (eps_uncond + alpha (eps_cond - eps_uncond))||^2."""
    return per_sample_mse(eps_student, cfg_combine(eps_uncond.float(), eps_cond.float(), guidance_scale))


def classifier_distill_loss(
    eps_student: torch.Tensor, eps: torch.Tensor, grad: torch.Tensor, beta_t: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Feed-forward guidance, classifier: ||eps_student - (eps + gamma sqrt(beta_t) grad)||^2.

    `grad` is d(loss to minimise)/d z_t as the shards store it; `beta_t` broadcasts against eps (B, 1, 1, 1).
    """
    return per_sample_mse(eps_student, classifier_guided_eps(eps.float(), grad.float(), beta_t.float(), gamma))


def w_distill_loss(
    eps_student: torch.Tensor, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Meng et al. stage 1: ||eps_student(z_t, c, w) - (eps_uncond + w (eps_cond - eps_uncond))||^2, w per sample."""
    w = w.float().reshape(-1, *([1] * (eps_cond.ndim - 1)))
    return per_sample_mse(eps_student, cfg_combine(eps_uncond.float(), eps_cond.float(), w))


def sample_w(batch: int, w_min: float, w_max: float, generator: torch.Generator) -> torch.Tensor:
    """w ~ U[w_min, w_max], one per sample (float32, CPU)."""
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator)
