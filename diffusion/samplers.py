"""Samplers, one signature each: (model pieces, initial noise, prompts or their embeddings, steps) -> clean latents.

The deterministic steps are diffusers' DDIM (Song et al. 2021) on the teacher's own scheduler config, so a
custom guidance rule sees exactly the grid `StableDiffusionPipeline` would use.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler

from diffusion.classifier_guidance import GuidanceLoss, eps_and_grad
from diffusion.conditioning import Conditioning
from diffusion.guidance import DEFAULT_COEFFICIENT, classifier_guided_eps, guidance_coefficient
from diffusion.schedule import NoiseSchedule
from diffusion.teacher import Teacher
from diffusion.unet import unet_eps


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard normal latent per seed, drawn on the CPU: independent of batch size, process count, device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def ddim_scheduler(scheduler_config: dict, steps: int) -> DDIMScheduler:
    """DDIM on the teacher's schedule, fed eps whatever the teacher predicts (we convert first)."""
    scheduler = DDIMScheduler.from_config({**scheduler_config, "prediction_type": "epsilon"})
    scheduler.set_timesteps(steps)
    return scheduler


def classifier_guided_ddim(
    teacher: Teacher, loss_fn: GuidanceLoss, gamma: float, prompts: list[str], noise: torch.Tensor, steps: int,
    coefficient: str = DEFAULT_COEFFICIENT,
) -> torch.Tensor:
    """Classifier guidance (Dhariwal & Nichol 2021) at every DDIM step: eps + gamma c_t grad, with grad the
    gradient of the loss on the decoded x0-hat and c_t = sqrt(beta_t) (`coefficient` "sqrt-beta", the seed's
    Eq. 4) or sigma_t ("sigma"). One UNet pass, a VAE decode and a backward per step. The text is encoded for
    the image side the noise decodes to (SDXL's micro-conditioning, as its pipeline does at that size)."""
    scheduler = ddim_scheduler(teacher.scheduler_config, steps)
    text = teacher.encode_text(prompts, size=noise.shape[-1] * teacher.vae_scale_factor)
    z = noise.to(teacher.device, torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_batch = t.repeat(z.shape[0]).to(teacher.device)
        eps, grad = eps_and_grad(teacher, z, t_batch, text, prompts, loss_fn)
        c_t = guidance_coefficient(teacher.schedule, t_batch, eps, coefficient)
        guided = classifier_guided_eps(eps, grad, c_t, gamma)
        z = scheduler.step(guided, t, z).prev_sample
    return z


def sid_one_step(unet, schedule: NoiseSchedule, noise: torch.Tensor, t_init: int, text: Conditioning) -> torch.Tensor:
    """The SiD one-step generator (Zhou et al. 2024, SiD-LSG eq. 2): x_g = f(sigma_init z, t_init, c) read as x0,
    i.e. (z_init - sigma_init eps) / a_init with z_init = sigma_init z = sqrt(1 - alphabar_tinit) z. Float32;
    differentiable in the generator's weights. The same function trains the generator and samples it."""
    t = torch.full((noise.shape[0],), int(t_init), dtype=torch.long, device=noise.device)
    z_init = schedule.sigma(t, noise) * noise.float()
    eps = unet_eps(unet, schedule, z_init, t, text)
    return schedule.eps_to_x0(z_init, eps, t)


# Few-step sampling on a student's own grid (progressive distillation, Salimans & Ho 2022; Meng et al. 2023).
CLEAN = -1  # the end of every step grid: a = 1, sigma = 0 (the clean sample)


def step_grid(steps: int, num_train_timesteps: int) -> list[int]:
    """The N timesteps of an N-step sampler, descending: t_i = round((N - i) T / N) - 1, then the end (CLEAN).
    This is diffusers' "trailing" spacing; the 2N grid holds the N grid at its even indices, for any N."""
    return [int(np.round((steps - i) * num_train_timesteps / steps)) - 1 for i in range(steps)]


def grid_coefficients(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, sigma_t) broadcast against `like`, with (1, 0) where t is CLEAN."""
    clean = (t == CLEAN).reshape(-1, *([1] * (like.ndim - 1))).to(like.device)
    safe = t.clamp(min=0)
    a = torch.where(clean, torch.ones((), dtype=like.dtype, device=like.device), schedule.a(safe, like))
    sigma = torch.where(clean, torch.zeros((), dtype=like.dtype, device=like.device), schedule.sigma(safe, like))
    return a, sigma


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, a_t, sigma_t, a_s, sigma_s) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) from t to s < t: a_s x0_hat + sigma_s eps."""
    x0 = (z_t - sigma_t * eps) / a_t
    return a_s * x0 + sigma_s * eps


def forward_noise(z_s: torch.Tensor, a_s, sigma_s, a_t, sigma_t, noise: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_s) for t > s: (a_t / a_s) z_s + sqrt(sigma_t^2 - (a_t / a_s)^2 sigma_s^2) noise."""
    ratio = a_t / a_s
    return ratio * z_s + (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0).sqrt() * noise


def _grid_eps(unet, schedule, z, t: int, text, guidance_scale):
    batch_t = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
    return unet_eps(unet, schedule, z, batch_t, text, guidance_scale=guidance_scale)


def _coefficients(schedule, t: int, like):
    return grid_coefficients(schedule, torch.tensor([t]), like[:1])


def grid_ddim(unet, schedule: NoiseSchedule, noise: torch.Tensor, text: Conditioning, steps: int,
              guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic N-step DDIM on the student's own grid (step_grid), from z = noise at t_0 to the clean end:
    one UNet pass per step; `guidance_scale` (one w per sample) for a w-conditioned student."""
    grid = step_grid(steps, schedule.num_timesteps) + [CLEAN]
    z = noise.float()
    for t, s in zip(grid[:-1], grid[1:]):
        eps = _grid_eps(unet, schedule, z, t, text, guidance_scale)
        z = ddim_step(z, eps, *_coefficients(schedule, t, z), *_coefficients(schedule, s, z))
    return z


def grid_stochastic(unet, schedule: NoiseSchedule, noise: torch.Tensor, text: Conditioning, steps: int,
                    generators: list[torch.Generator], guidance_scale: torch.Tensor | None = None,
                    trace=None) -> torch.Tensor:
    """Meng et al.'s N-step stochastic sampler (On Distillation of Guided Diffusion Models, CVPR 2023,
    arXiv:2210.03142, its section on N-step deterministic and stochastic sampling): N - 1 rounds of one deterministic DDIM step of length 2/N
    (t_i to t_{i+2}, the clean end for the last round) followed by fresh noise back up by 1/N (to t_{i+1}), then
    one final deterministic 1/N step from t_{N-1} to the clean sample: N UNet passes, as many as the
    deterministic sampler. The fresh noise of sample k comes from generators[k] (CPU), so an image does not
    depend on its batch. `trace(t, z)` sees z at every grid point a UNet pass starts from."""
    grid = step_grid(steps, schedule.num_timesteps) + [CLEAN]
    z = noise.float()
    for i in range(steps):
        t, target = grid[i], grid[min(i + 2, steps)]  # the last round and the final step both end at CLEAN
        if trace is not None:
            trace(t, z)
        eps = _grid_eps(unet, schedule, z, t, text, guidance_scale)
        z = ddim_step(z, eps, *_coefficients(schedule, t, z), *_coefficients(schedule, target, z))
        if i < steps - 1:  # noise back up by 1/N, to t_{i+1}
            fresh = torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(z.device)
            z = forward_noise(z, *_coefficients(schedule, target, z), *_coefficients(schedule, grid[i + 1], z), fresh)
    return z
