"""Turn a raw source sample into model input, or the reason it is skipped.

Images: any mode PIL reads (CMYK, grayscale, palette, alpha composited on white, 16-bit and float grayscale
scaled to 8 bits) becomes RGB, centre-cropped to a square and resized to the resolution with LANCZOS; below
`min_size` on the short side, or above Image.MAX_IMAGE_PIXELS, it is skipped.
Captions: UTF-8 or UTF-16 (diffusion.text_files), stripped, non-empty.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from diffusion.text_files import decode_text
from pipeline.sources import RawSample

Image.MAX_IMAGE_PIXELS = 8192 * 8192


class Skip(Exception):
    """A sample that can't become a record; the message is the reason counted in dataset.json."""


def decode_caption(caption: bytes | None) -> str:
    if caption is None:
        raise Skip("missing_caption")
    try:
        text = decode_text(caption).strip()
    except UnicodeDecodeError:
        raise Skip("caption_not_utf8") from None
    if not text:
        raise Skip("empty_caption")
    return text


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image as "L": 16-bit modes (I;16, I;16B, I;16L) scaled by 255/65535; "I" the
    same when its values fit 0..65535, else scaled so its maximum is 255; "F" read as 0..1 when its maximum is at
    most 1, else as 0..65535. Negatives (and NaN) become 0. PIL's own convert clips to 0..255 instead."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    peak = values.max(initial=0.0)
    if image.mode == "F" and peak <= 1.0:
        full_scale = 1.0
    elif image.mode == "I" and peak > 65535:
        full_scale = peak
    else:
        full_scale = 65535.0
    return Image.fromarray(np.round(np.clip(values / full_scale, 0.0, 1.0) * 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def micro_conditioning(width: int, height: int, resolution: int) -> list[int]:
    """SDXL's micro-conditioning of a source image of width x height made into the R x R sample (ImageOps.fit:
    the centred square crop, resized): [original height, width, crop top, crop left, R, R], the crop in the
    image resized so its short side is R (torchvision's Resize: the long side truncated), as diffusers' SDXL
    training script records it."""
    short = min(width, height)
    resized_height, resized_width = int(resolution * height / short), int(resolution * width / short)
    top = max(0, round((resized_height - resolution) / 2))
    left = max(0, round((resized_width - resolution) / 2))
    return [height, width, top, left, resolution, resolution]


def decode_image(data: bytes | None, resolution: int, min_size: int) -> tuple[torch.Tensor, str, list[int]]:
    """(3 x R x R float32 in [-1, 1], the source mode, its micro-conditioning) or Skip."""
    if not data:
        raise Skip("unreadable_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("image_too_large") from None
    except Exception:  # PIL raises many types for truncated, corrupt or non-image bytes
        raise Skip("unreadable_image") from None
    if min(image.size) < min_size:
        raise Skip("image_too_small")
    mode = image.mode
    square = ImageOps.fit(to_rgb(image), (resolution, resolution), method=Image.LANCZOS, centering=(0.5, 0.5))
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, mode, micro_conditioning(*image.size, resolution)


def prepare(raw: RawSample, resolution: int, min_size: int) -> tuple[torch.Tensor, str, str, list[int]]:
    """(pixels, caption, source image mode, micro-conditioning) or Skip."""
    if raw.skip:
        raise Skip(raw.skip)
    caption = decode_caption(raw.caption)
    pixels, mode, micro = decode_image(raw.image, resolution, min_size)
    return pixels, caption, mode, micro
