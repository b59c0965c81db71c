"""The distillation losses, one small pure function each: tensors in, per-sample loss out (no optimiser, no DDP).

Targets are computed in float32 from the teacher's stored outputs: in eps space for cfg-distill and
classifier-distill (seed 000, Eq. 5), in x space for w-distill and progressive (seed 001); the student's eps is
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
    eps_student: torch.Tensor, eps: torch.Tensor, grad: torch.Tensor, c_t: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Feed-forward guidance, classifier: ||eps_student - (eps + gamma c_t grad)||^2, c_t = sqrt(beta_t) in the
    seed's Eq. 4 or sigma_t in Dhariwal & Nichol's (`diffusion.guidance.guidance_coefficient`).

    `grad` is d(loss to minimise)/d z_t as the shards store it; `c_t` broadcasts against eps (B, 1, 1, 1).
    """
    return per_sample_mse(eps_student, classifier_guided_eps(eps.float(), grad.float(), c_t.float(), gamma))


def w_distill_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The teacher's guided eps at each sample's own w: eps_uncond + w (eps_cond - eps_uncond), in float32."""
    w = w.float().reshape(-1, *([1] * (eps_cond.ndim - 1)))
    return cfg_combine(eps_uncond.float(), eps_cond.float(), w)


def w_distill_loss(x0_student: torch.Tensor, x0_teacher_w: torch.Tensor, a_t: torch.Tensor,
                   sigma_t: torch.Tensor) -> torch.Tensor:
    """Meng et al. stage 1, as seed 001 writes it: omega(lambda_t) ||x_student(z_t, w) - x_teacher^w(z_t)||^2 in
    x space (mean over elements), with omega = max(SNR, 1) = max(a_t^2 / sigma_t^2, 1), the truncated-SNR
    weight the progressive stage (stage 2) uses too, so both stages agree on which t matter."""
    return truncated_snr_weight(a_t, sigma_t) * per_sample_mse(x0_student, x0_teacher_w)


def w_distill_eps_loss(eps_student: torch.Tensor, eps_teacher_w: torch.Tensor) -> torch.Tensor:
    """The earlier form (`--w-loss eps`): an unweighted eps-MSE, i.e. the x loss weighted by SNR with no floor
    (at t = 999 on SD's schedule 214x below max(SNR, 1))."""
    return per_sample_mse(eps_student, eps_teacher_w)


def sample_w(batch: int, w_min: float, w_max: float, generator: torch.Generator) -> torch.Tensor:
    """w ~ U[w_min, w_max], one per sample (float32, CPU)."""
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator)


def per_sample_sum(values: torch.Tensor) -> torch.Tensor:
    """sum over all but the batch dimension, in float32."""
    return values.float().flatten(1).sum(dim=1)


def sid_fake_score_loss(eps_fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """SiD-LSG, the fake score network's loss: sum of (eps_fake^kappa1(x_t) - eps)^2 over the elements of each
    sample, with x_t = a_t x_g + sigma_t eps and x_g held fixed (denoising score matching on generated data)."""
    return per_sample_sum((eps_fake.float() - eps.float()).pow(2))


def sid_omega(x_g: torch.Tensor, y_real: torch.Tensor, floor: float = 1e-5) -> torch.Tensor:
    """omega = mean over C, H, W of |x_g - y_real| per sample, without gradient, clamped at `floor`;
    shaped (B, 1, 1, 1) (SiD eq. 10's normaliser)."""
    with torch.no_grad():
        omega = (x_g.float() - y_real.float()).abs().flatten(1).mean(dim=1).clamp(min=floor)
    return omega.reshape(-1, *([1] * (x_g.ndim - 1)))


def sid_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float = 1.0,
    y_fake_kappa3: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiD-LSG, the generator's loss per sample (sum over elements):
    (y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake')) / omega, with y_real the teacher's x0 at
    kappa4, y_fake its fake twin at kappa2 and y_fake' at kappa3 (the same tensor when kappa2 = kappa3).
    With alpha = 1 and kappa2 = kappa3 it is (y_real - y_fake)(y_fake - x_g) / omega."""
    x_g, y_real, y_fake = x_g.float(), y_real.float(), y_fake.float()
    y_fake3 = y_fake if y_fake_kappa3 is None else y_fake_kappa3.float()
    omega = sid_omega(x_g, y_real)
    return per_sample_sum((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake3)) / omega)


def finite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the samples (first dimension) whose values are finite in every tensor."""
    mask = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for tensor in tensors:
        mask &= torch.isfinite(tensor.detach()).flatten(1).all(dim=1)
    return mask


def progressive_target(z_t: torch.Tensor, z_s2: torch.Tensor, a_t, sigma_t, a_s2, sigma_s2) -> torch.Tensor:
    """Progressive distillation's target (Salimans & Ho 2022, Alg. 2): the x0 that makes one DDIM step from t land
    on the teacher's two-step result z_t'': x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (a_t'' - (sigma_t''/sigma_t) a_t).
    At the clean end (a_t'' = 1, sigma_t'' = 0) it is z_t'' itself."""
    ratio = sigma_s2 / sigma_t
    return (z_s2.float() - ratio * z_t.float()) / (a_s2 - ratio * a_t)


def truncated_snr_weight(a_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """max(a_t^2 / sigma_t^2, 1): Salimans & Ho's "truncated SNR" weighting of an x0 loss, one per sample."""
    return (a_t.float() ** 2 / sigma_t.float() ** 2).clamp(min=1.0).flatten()


def progressive_loss(x0_student: torch.Tensor, x_target: torch.Tensor, a_t: torch.Tensor,
                     sigma_t: torch.Tensor) -> torch.Tensor:
    """max(a_t^2/sigma_t^2, 1) ||x0_student - x~||^2 (mean over elements), per sample."""
    return truncated_snr_weight(a_t, sigma_t) * per_sample_mse(x0_student, x_target)
