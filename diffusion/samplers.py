"""Samplers, one signature each: (model pieces, initial noise, prompts or their embeddings, steps) -> clean latents.

The deterministic steps are diffusers' DDIM (Song et al. 2021) on the teacher's own scheduler config, so a
custom guidance rule sees exactly the grid `StableDiffusionPipeline` would use.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from diffusion.classifier_guidance import GuidanceLoss, eps_and_grad
from diffusion.guidance import classifier_guided_eps
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
    teacher: Teacher, loss_fn: GuidanceLoss, gamma: float, prompts: list[str], noise: torch.Tensor, steps: int
) -> torch.Tensor:
    """Classifier guidance (Dhariwal & Nichol 2021) at every DDIM step: eps + gamma sqrt(beta_t) grad, with grad
    the gradient of the loss on the decoded x0-hat. One UNet pass, a VAE decode and a backward per step."""
    scheduler = ddim_scheduler(teacher.scheduler_config, steps)
    text = teacher.encode_text(prompts)
    z = noise.to(teacher.device, torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_batch = t.repeat(z.shape[0]).to(teacher.device)
        eps, grad = eps_and_grad(teacher, z, t_batch, text, prompts, loss_fn)
        guided = classifier_guided_eps(eps, grad, teacher.schedule.beta(t_batch, eps), gamma)
        z = scheduler.step(guided, t, z).prev_sample
    return z


def sid_one_step(unet, schedule: NoiseSchedule, noise: torch.Tensor, t_init: int, text: torch.Tensor,
                 forward=None) -> torch.Tensor:
    """The SiD one-step generator (Zhou et al. 2024, SiD-LSG eq. 2): x_g = f(sigma_init z, t_init, c) read as x0,
    i.e. (z_init - sigma_init eps) / a_init with z_init = sigma_init z = sqrt(1 - alphabar_tinit) z. Float32;
    differentiable in the generator's weights. The same function trains the generator and samples it."""
    t = torch.full((noise.shape[0],), int(t_init), dtype=torch.long, device=noise.device)
    z_init = schedule.sigma(t, noise) * noise.float()
    eps = unet_eps(unet, schedule, z_init, t, text, forward=forward)
    return schedule.eps_to_x0(z_init, eps, t)
