"""The image sides a pipeline folder can be trained and sampled at, and the side a student is saved with.

A side must be a multiple of the VAE's factor times 2 per UNet downsampling (so the latent halves exactly on the
way down and every up block meets its skip connection without a guessed size) and of 8 (StableDiffusionPipeline
refuses other heights and widths). SD 1.x/2.x: 64; the digits teacher: 8. A student's UNet config carries the
side it was trained at as `sample_size` (in latents), so `evaluation` and stock pipelines sample it there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusers import UNet2DConditionModel

from diffusion.errors import UserError

PIPELINE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs: height and width divisible by 8


def _downsampling(folder: Path, component: str) -> int:
    """2 ** (number of down blocks - 1): the factor by which the component shrinks an image or latent."""
    config = json.loads((Path(folder) / component / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def vae_factor(folder: str | Path) -> int:
    return _downsampling(Path(folder), "vae")


def resolution_multiple(folder: str | Path) -> int:
    """The step between the sides the pipeline folder (teacher or student) can be trained and sampled at."""
    return math.lcm(vae_factor(folder) * _downsampling(Path(folder), "unet"), PIPELINE_MULTIPLE)


def check_resolution(resolution: int, folder: str | Path, what: str = "--resolution") -> None:
    """A one-line error unless `resolution` is a positive multiple of the folder's resolution_multiple."""
    multiple = resolution_multiple(folder)
    if resolution < 1 or resolution % multiple:
        raise UserError(f"{what} {resolution} is not a multiple of {multiple} (the VAE's factor "
                        f"{vae_factor(folder)} x 2 per UNet downsampling, and of {PIPELINE_MULTIPLE} for "
                        f"StableDiffusionPipeline); try {max(multiple, round(resolution / multiple) * multiple)}")


def set_trained_resolution(unet: UNet2DConditionModel, resolution: int, folder: str | Path) -> None:
    """Record the side a student is trained at in its UNet config (sample_size is in latents)."""
    unet.register_to_config(sample_size=resolution // vae_factor(folder))
