"""The teacher work for one batch of prepared samples: VAE encode, noise, and the guidance ingredients.

Randomness is drawn per sample from (seed, source key), never per batch, so a sample's t and noise do not
depend on batch size, worker count or process count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from diffusion.classifier_guidance import GuidanceSpec, eps_and_grad
from diffusion.conditioning import Conditioning
from diffusion.teacher import Teacher
from shards.format import Record, record_key


@dataclass
class Prepared:
    source_key: str
    unit: str
    pixels: torch.Tensor  # 3 x R x R in [-1, 1]
    caption: str
    t: torch.Tensor  # int64 scalar
    noise: torch.Tensor  # latent shape
    vae_noise: torch.Tensor  # latent shape
    micro: list[int]  # original size, crop top-left, target size (shards.format)


def sample_generator(seed: int, source_key: str) -> torch.Generator:
    """A CPU generator seeded from sha256(seed, source key)."""
    digest = hashlib.sha256(f"{seed}\0{source_key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw(seed: int, source_key: str, latent_shape, t_min: int, t_max: int):
    """(t, noise, vae_noise) for one sample: t uniform in [t_min, t_max], both noises standard normal."""
    generator = sample_generator(seed, source_key)
    t = torch.randint(t_min, t_max + 1, (), generator=generator)
    noise = torch.randn(latent_shape, generator=generator)
    vae_noise = torch.randn(latent_shape, generator=generator)
    return t, noise, vae_noise


@torch.no_grad()
def teacher_outputs(
    teacher: Teacher, guidance: GuidanceSpec, batch: list[Prepared], uncond: Conditioning, store_clean: bool
) -> dict[str, torch.Tensor]:
    """The batch's stored tensors, on the teacher's device (on CUDA, still computing when this returns)."""
    device = teacher.device
    t = torch.stack([p.t for p in batch]).to(device)
    noise = torch.stack([p.noise for p in batch]).to(device)
    z0 = teacher.encode_images(torch.stack([p.pixels for p in batch]), torch.stack([p.vae_noise for p in batch])).float()
    # The teacher sees the z_t that is stored (float16), so a record is self-consistent.
    z_t = teacher.schedule.add_noise(z0, noise, t).half().float()
    captions = [p.caption for p in batch]
    cond = teacher.encode_text(captions).with_micro(torch.tensor([p.micro for p in batch]))
    if guidance.kind == "cfg":
        eps_cond, eps_uncond = teacher.eps_cond_uncond(z_t, t, cond, uncond)
        outputs = {"zt": z_t, "eps_cond": eps_cond, "eps_uncond": eps_uncond}
    else:
        eps, grad = eps_and_grad(teacher, z_t, t, cond, captions, guidance.loss)
        outputs = {"zt": z_t, "eps": eps, "grad": grad}
    if store_clean:
        outputs.update(z0=z0, noise=noise)
    return outputs


def to_records(batch: list[Prepared], outputs: dict[str, torch.Tensor]) -> list[Record]:
    host = {name: value.to("cpu", torch.float16) for name, value in outputs.items()}
    return [
        Record(record_key(p.source_key), {name: value[i] for name, value in host.items()}, int(p.t), p.caption,
               {"source_key": p.source_key, "unit": p.unit, "micro": p.micro})
        for i, p in enumerate(batch)
    ]
