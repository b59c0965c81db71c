"""Validation images for every method: fixed prompts and seeds, so the grids compare over time.

`Validation` draws prompt i with seed i (`initial_noise`), samples with a method's sampler, decodes with the
teacher's VAE in float32, writes one grid as OUT/samples/<label>.png and logs the same image to the run's
accelerate trackers (TensorBoard: `writer.add_image`; others: their `log_images`). How each student samples
(the methods' own recipes, evaluation.models):

| method | sampler |
|---|---|
| cfg-distill, classifier-distill | VALIDATION_STEPS-step DDIM on the trailing grid (`grid_ddim`), guidance 1 |
| w-distill | the same at w = the middle of [--w-min, --w-max] |
| progressive | the round's N-step grid at w = the middle of the round's w range |
| sid-lsg | one step (`sid_one_step`) from the EMA generator |

The shard-fed loops (fit, progressive) validate every --validate-every steps on --validation-prompts, with the
EMA weights when there is an EMA; sid-lsg keeps its own cadence and prompts (--grid-every-kimg, --grid-prompts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from diffusion.prompt_files import read_prompt_file
from diffusion.samplers import grid_ddim, initial_noise, sid_one_step
from diffusion.teacher import load_model
from trainer.fsdp import is_sharded, unsharded
from trainer.student import averaged_weights, trainable_parameters

GRID_BATCH = 8  # prompts per sampling batch: a grid costs this much memory whatever its size
VALIDATION_STEPS = 8  # DDIM steps of the one-pass-per-step students (cfg-, classifier-, w-distill)
TAG = "validation"  # the image's name in the trackers

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise, text embeddings) -> clean latents


def step_label(step: int) -> str:
    return f"step-{step:08d}"


def kimg_label(images: int) -> str:
    return f"kimg-{images / 1000:011.3f}"


def grid_sampler(schedule, steps: int, w: float | None, unet) -> Sampler:
    """Deterministic `steps`-step DDIM on the student's own grid; `w` for a w-conditioned student."""

    def sample(noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = None if w is None else torch.full((noise.shape[0],), float(w), device=noise.device)
        return grid_ddim(unet, schedule, noise, text, steps, scale)

    return sample


def fit_sampler(cfg, schedule, unet) -> Sampler:
    """cfg- and classifier-distill students at guidance 1; a w-distill student at the middle of its w range."""
    w = (cfg.w_min + cfg.w_max) / 2 if cfg.method == "w-distill" else None
    return grid_sampler(schedule, VALIDATION_STEPS, w, unet)


def sid_sampler(generator, schedule, t_init: int) -> Sampler:
    return lambda noise, text: sid_one_step(generator, schedule, noise, t_init, text)


def grid_image(pixels: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] as one uint8 HWC grid, about square (torchvision's grid, as save_image writes it)."""
    grid = make_grid((pixels / 2 + 0.5).clamp(0, 1), nrow=max(1, int(len(pixels) ** 0.5)))
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def log_image(accelerator, image: np.ndarray, step: int) -> None:
    """The grid in every tracker of the run that takes images (none with --report-to none)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(TAG, image, step, dataformats="HWC")
            tracker.writer.flush()
        elif hasattr(tracker, "log_images"):
            tracker.log_images({TAG: [image]}, step=step)


def latent_shape(unet) -> tuple[int, int, int]:
    """The (C, H, W) latents a UNet samples at: its sample_size, the trained resolution."""
    config = unet.config
    return (config.in_channels, config.sample_size, config.sample_size)


@dataclass
class Validation:
    """Fixed prompts (seed i for prompt i) at a latent shape, through a teacher's text encoder and float32 VAE."""

    teacher: Any  # diffusion.teacher.Teacher with its VAE in float32
    prompts: list[str]
    shape: tuple[int, int, int]
    out: Path
    accelerator: Any

    @torch.no_grad()
    def __call__(self, sample: Sampler, label: str, step: int) -> Path:
        """OUT/samples/<label>.png, and the same image in the trackers at `step`."""
        noise = initial_noise(list(range(len(self.prompts))), self.shape)
        pixels = []
        for first in range(0, len(self.prompts), GRID_BATCH):
            z = noise[first:first + GRID_BATCH].to(self.teacher.device)
            size = self.shape[-1] * self.teacher.vae_scale_factor
            x0 = sample(z, self.teacher.encode_text(self.prompts[first:first + GRID_BATCH], size=size))
            pixels.append(self.teacher.decode(x0).float().cpu())
        image = grid_image(torch.cat(pixels))
        path = self.out / "samples" / f"{label}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        log_image(self.accelerator, image, step)
        return path


def shard_loop_validation(cfg, accelerator, teacher, student) -> Validation | None:
    """fit's and progressive's Validation: --validation-prompts (read on every rank, so a bad file stops them
    all) and the teacher's VAE in float32, loaded on the main process only, which alone validates; None when
    --validate-every is 0 and on the other ranks."""
    if not cfg.validate_every:
        return None
    prompts = read_prompt_file(cfg.validation_prompts, option="--validation-prompts").prompts
    if not accelerator.is_main_process:
        return None
    vae = load_model(teacher.root, "vae", torch.float32, teacher.variants["vae"]).to(accelerator.device)
    shape = latent_shape(accelerator.unwrap_model(student))
    return Validation(dataclasses.replace(teacher, vae=vae), prompts, shape, Path(cfg.out), accelerator)


def step_validation(cfg, validation: Validation | None, accelerator, student, ema,
                    sampler: Callable[[Any], Sampler]) -> Callable[[int], None] | None:
    """`validate(step)` for trainer.fit.run_steps, called on every rank: the main process writes
    OUT/samples/step-NNNNNNNN.png of `sampler(unet)`, the unwrapped student with the EMA's weights swapped in for
    the while (trainer.ema.WarmupEMA); a sharded (FSDP) student is gathered whole onto it first, every rank
    taking part (trainer.fsdp.unsharded). None when --validate-every is 0."""
    if not cfg.validate_every:
        return None

    def validate(step: int) -> None:
        unet = accelerator.unwrap_model(student)
        if validation is None and not is_sharded(unet):
            return  # another rank validates, with nothing to gather from this one
        with averaged_weights(ema, trainable_parameters(unet)):
            whole = unsharded(unet, accelerator.device)
            if validation is not None:
                validation(sampler(whole), step_label(step), step)

    return validate
