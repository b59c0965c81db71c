"""Sample grids during SiD training: the (EMA) generator on fixed prompts and seeds, so grids compare over time."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from diffusion.samplers import initial_noise, sid_one_step

GRID_BATCH = 8


@torch.no_grad()
def save_sample_grid(generator, teacher, prompts: list[str], t_init: int, out: Path, images_seen: int) -> Path:
    """OUT/samples/kimg-NNNNNNN.NNN.png: prompt i with seed i, decoded by the teacher's VAE (float32)."""
    config = generator.config
    latents = initial_noise(list(range(len(prompts))), (config.in_channels, config.sample_size, config.sample_size))
    pixels = []
    for first in range(0, len(prompts), GRID_BATCH):
        z = latents[first:first + GRID_BATCH].to(teacher.device)
        text = teacher.encode_text(prompts[first:first + GRID_BATCH])
        x_g = sid_one_step(generator, teacher.schedule, z, t_init, text)
        pixels.append(teacher.decode(x_g).float().cpu())
    path = Path(out) / "samples" / f"kimg-{images_seen / 1000:011.3f}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = (torch.cat(pixels) / 2 + 0.5).clamp(0, 1)
    save_image(grid, path, nrow=max(1, int(len(prompts) ** 0.5)))
    return path
