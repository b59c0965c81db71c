"""The one wrapper around a diffusers UNet that every stage uses: eps of any prediction type, and the w embedding.

The guidance-weight (w) embedding follows the mechanism diffusers' StableDiffusionPipeline already feeds: when
`unet.config.time_cond_proj_dim` is set, the pipeline runs one pass per step (no CFG batch) and passes
`timestep_cond = get_guidance_scale_embedding(guidance_scale - 1, time_cond_proj_dim)`; the UNet adds
`cond_proj(timestep_cond)` to its sinusoidal timestep features. Our w is diffusers' `guidance_scale` s in
eps = eps_uncond + s (eps_cond - eps_uncond); Meng et al. write the same guidance as (1 + w') x_c - w' x_u, so
their w' = s - 1, which is exactly what the pipeline embeds.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel

from diffusion.conditioning import Conditioning, as_conditioning
from diffusion.schedule import NoiseSchedule


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal features of w * 1000 (VDM, appendix; as diffusers' `get_guidance_scale_embedding`), float32."""
    w = w.float().flatten() * 1000.0
    half = embedding_dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    angles = w[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        features = torch.nn.functional.pad(features, (0, 1))
    return features


def w_condition(guidance_scale: torch.Tensor, unet: UNet2DConditionModel) -> torch.Tensor:
    """The `timestep_cond` StableDiffusionPipeline passes for guidance_scale s: the embedding of s - 1."""
    return guidance_scale_embedding(guidance_scale - 1.0, unet.config.time_cond_proj_dim)


def is_w_conditioned(unet: UNet2DConditionModel) -> bool:
    return unet.config.time_cond_proj_dim is not None


def unet_eps(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    z_t: torch.Tensor,
    t: torch.Tensor,
    text: Conditioning | torch.Tensor,
    guidance_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps(z_t, t, c[, w]) in float32, whatever the UNet's prediction type; differentiable. `text` is what the
    teacher's `encode_text` gives (a bare tensor is SD's hidden states).

    `unet` may be wrapped for training (DDP: the wrapper is called, so gradients sync; its `.module` gives the
    config). `guidance_scale` (one per sample) is required by a w-conditioned UNet and refused by any other.
    """
    inner = getattr(unet, "module", unet)
    kwargs = {}
    if is_w_conditioned(inner):
        if guidance_scale is None:
            raise ValueError("this UNet is w-conditioned: pass guidance_scale (one value per sample)")
        kwargs["timestep_cond"] = w_condition(guidance_scale.to(z_t.device), inner).to(inner.dtype)
    elif guidance_scale is not None:
        raise ValueError("guidance_scale given to a UNet without a guidance embedding (time_cond_proj_dim)")
    t = t.to(z_t.device)
    out = unet(z_t.to(inner.dtype), t, **as_conditioning(text).unet_kwargs(inner.dtype), **kwargs).sample
    return schedule.model_output_to_eps(out.float(), z_t.float(), t)


def add_guidance_embedding(unet: UNet2DConditionModel, embedding_dim: int = 256) -> UNet2DConditionModel:
    """A copy of `unet` with a w embedding on the `time_cond_proj_dim` path, equal to `unet` for every w.

    The new `cond_proj` layer is zero-initialised, so the student starts as the teacher's conditional model.
    """
    if is_w_conditioned(unet):
        dim = unet.config.time_cond_proj_dim
        raise ValueError(f"the UNet already has a guidance embedding (time_cond_proj_dim={dim})")
    student = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"unexpected weights adding the w embedding: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.to(unet.device)
    return student if student.dtype == unet.dtype else student.to(unet.dtype)


def cond_uncond_eps(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    z_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    uncond: Conditioning | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_cond, eps_uncond), float32, from one forward of 2B samples (`uncond` one row, or one per sample;
    Conditioning.paired_with); differentiable."""
    batch = z_t.shape[0]
    both = as_conditioning(cond).paired_with(as_conditioning(uncond))
    eps = unet_eps(unet, schedule, torch.cat([z_t, z_t]), torch.cat([t, t]), both)
    return eps[:batch], eps[batch:]


def guided_eps(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    z_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    uncond: Conditioning | torch.Tensor,
    kappas: tuple[float, ...],
) -> list[torch.Tensor]:
    """eps_uncond + kappa (eps_cond - eps_uncond) for each kappa, float32, differentiable in z_t.

    One forward of 2B samples (cond and uncond batched) when some kappa != 1; a single conditional forward of
    B samples when every kappa is 1. `uncond` may be one row, broadcast to the batch.
    """
    if all(k == 1.0 for k in kappas):
        eps = unet_eps(unet, schedule, z_t, t, cond)
        return [eps for _ in kappas]
    eps_cond, eps_uncond = cond_uncond_eps(unet, schedule, z_t, t, cond, uncond)
    return [eps_uncond + k * (eps_cond - eps_uncond) for k in kappas]


def guided_x0(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    z_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    uncond: Conditioning | torch.Tensor,
    kappas: tuple[float, ...],
) -> list[torch.Tensor]:
    """The guided denoiser: x0 = (z_t - sigma_t eps_kappa) / a_t for each kappa (see `guided_eps`)."""
    return [schedule.eps_to_x0(z_t.float(), eps, t) for eps in guided_eps(unet, schedule, z_t, t, cond, uncond,
                                                                          kappas)]
