"""`evaluation render`: one PNG per prompt, seeded per prompt, split across ranks, resumable.

Image i uses initial noise drawn on the CPU from seed + i, so an image does not depend on the batch size, the
process count or the device. Images are written as OUT/images/{i:05d}.png (a temporary name, then rename), and
a re-run skips those already there. Each rank logs what it rendered in OUT/render-rankR.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from diffusion.launch import check_world_size
from diffusion.resolution import check_resolution, vae_factor
from diffusion.samplers import initial_noise
from evaluation.models import ModelSpec, load_pipeline


STOCHASTIC_SEED_OFFSET = 2**31  # the stochastic sampler's noise for image i: seed + i + this


def image_path(out: Path, index: int) -> Path:
    return Path(out) / "images" / f"{index:05d}.png"


class Renderer:
    """Turns (prompts, seeds) into PIL images for one model."""

    def __init__(self, spec: ModelSpec, steps: int, dtype: str = "fp32", device=None, clip_model="ViT-g-14",
                 clip_weights=None, resolution: int | None = None):
        self.spec, self.steps = spec, 1 if spec.one_step else spec.steps or steps
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = self.teacher = self.loss = None
        if spec.one_step or spec.kind == "progressive":  # our samplers, through the wrapper that trained the UNet
            from diffusion.teacher import load_teacher

            self.teacher = load_teacher(spec.folder, dtype, self.device, with_fingerprint=False)
            self.unet, self.vae = self.teacher.unet, self.teacher.vae
            if self.vae.dtype != torch.float32:
                self.vae.to(torch.float32)
        elif spec.kind == "teacher-classifier":  # our own DDIM loop with the guidance loss; no pipeline
            from diffusion.classifier_guidance import resolve_guidance
            from diffusion.teacher import load_teacher

            self.teacher = load_teacher(spec.folder, dtype, self.device, with_fingerprint=False, variant=spec.variant)
            self.loss = resolve_guidance(spec.classifier_guidance, clip_model=clip_model, clip_weights=clip_weights,
                                         device=self.device).loss
            self.unet, self.vae = self.teacher.unet, self.teacher.vae
        else:
            self.pipe = load_pipeline(spec, dtype, self.device)
            self.unet, self.vae = self.pipe.unet, self.pipe.vae
        factor = vae_factor(spec.folder)
        self.resolution = resolution or self.unet.config.sample_size * factor  # a student's: its training side
        check_resolution(self.resolution, spec.folder)
        side = self.resolution // factor
        self.latent_shape = (self.unet.config.in_channels, side, side)

    def latents(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Clean latents for the prompts, from noise seeded per image."""
        noise = initial_noise(seeds, self.latent_shape)
        if self.spec.one_step:
            from diffusion.samplers import sid_one_step

            with torch.no_grad():
                text = self.teacher.encode_text(prompts, size=self.resolution)
                return sid_one_step(self.unet, self.teacher.schedule, noise.to(self.device), self.spec.t_init, text)
        if self.spec.kind == "progressive":
            return self._few_step_latents(prompts, seeds, noise)
        if self.teacher is not None:
            from diffusion.samplers import classifier_guided_ddim

            return classifier_guided_ddim(self.teacher, self.loss, self.spec.guidance_scale, prompts, noise,
                                          self.steps, self.spec.coefficient)
        with torch.no_grad():
            return self.pipe(prompts, num_inference_steps=self.steps, guidance_scale=self.spec.guidance_scale,
                             height=self.resolution, width=self.resolution, output_type="latent",
                             latents=noise.to(self.device, self.pipe.unet.dtype)).images

    @torch.no_grad()
    def _few_step_latents(self, prompts: list[str], seeds: list[int], noise: torch.Tensor) -> torch.Tensor:
        """A progressive student on its own grid at w; the stochastic sampler's fresh noise is seeded per image."""
        from diffusion.samplers import grid_ddim, grid_stochastic

        text = self.teacher.encode_text(prompts, size=self.resolution)
        w = torch.full((len(prompts),), float(self.spec.guidance_scale), device=self.device)
        noise = noise.to(self.device)
        if self.spec.sampler == "stochastic":
            generators = [torch.Generator().manual_seed(s + STOCHASTIC_SEED_OFFSET) for s in seeds]
            return grid_stochastic(self.unet, self.teacher.schedule, noise, text, self.steps, generators, w)
        return grid_ddim(self.unet, self.teacher.schedule, noise, text, self.steps, w)

    @torch.no_grad()
    def render(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        z0 = self.latents(prompts, seeds).to(self.vae.dtype)
        pixels = self.vae.decode(z0 / self.vae.config.scaling_factor).sample
        array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def render_prompts(renderer: Renderer, prompts: list[str], out: Path, seed: int, batch_size: int) -> dict:
    """Render this rank's share (index % world == rank) of the prompts not yet on disk; every rank returns its
    counts, and rank 0 waits for all."""
    state = PartialState(cpu=not torch.cuda.is_available())
    check_world_size(state.num_processes)
    (Path(out) / "images").mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(state.process_index, len(prompts), state.num_processes)]
    todo = [i for i in mine if not image_path(out, i).is_file()]
    start = time.perf_counter()
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"render {renderer.spec.label}", unit="img",
              disable=not state.is_main_process) as progress:
        for first in range(0, len(todo), batch_size):
            batch = todo[first:first + batch_size]
            images = renderer.render([prompts[i] for i in batch], [seed + i for i in batch])
            for index, image in zip(batch, images):
                save_png(image, image_path(out, index))
            progress.update(len(batch))
    seconds = time.perf_counter() - start
    log = {"rank": state.process_index, "rendered": todo, "skipped": len(mine) - len(todo), "seconds": seconds}
    (Path(out) / f"render-rank{state.process_index}.json").write_text(json.dumps(log))
    state.wait_for_everyone()
    return {"rendered": len(todo), "skipped": len(mine) - len(todo), "seconds": seconds}


def load_images(out: Path, count: int) -> list[np.ndarray]:
    """The rendered images 0..count-1 as uint8 HxWx3 arrays; a missing one is an error."""
    missing = [i for i in range(count) if not image_path(out, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing in {out}/images (first: {missing[0]:05d}.png)")
    return [np.asarray(Image.open(image_path(out, i)).convert("RGB")) for i in range(count)]
