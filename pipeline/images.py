"""Turn a raw source sample into model input, or the reason it is skipped.

Images: any mode PIL reads (CMYK, grayscale, palette, alpha composited on white) becomes RGB, centre-cropped
to a square and resized to the resolution with LANCZOS; below `min_size` on the short side it is skipped.
Captions: UTF-8, stripped, non-empty.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.sources import RawSample

Image.MAX_IMAGE_PIXELS = 8192 * 8192


class Skip(Exception):
    """A sample that can't become a record; the message is the reason counted in dataset.json."""


def decode_caption(caption: bytes | None) -> str:
    if caption is None:
        raise Skip("missing_caption")
    try:
        text = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Skip("caption_not_utf8") from None
    if not text:
        raise Skip("empty_caption")
    return text


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes | None, resolution: int, min_size: int) -> tuple[torch.Tensor, str]:
    """(3 x R x R float32 in [-1, 1], the source mode) or Skip."""
    if not data:
        raise Skip("unreadable_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception:  # PIL raises many types for truncated, corrupt or non-image bytes
        raise Skip("unreadable_image") from None
    if min(image.size) < min_size:
        raise Skip("image_too_small")
    mode = image.mode
    square = ImageOps.fit(to_rgb(image), (resolution, resolution), method=Image.LANCZOS, centering=(0.5, 0.5))
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, mode


def prepare(raw: RawSample, resolution: int, min_size: int) -> tuple[torch.Tensor, str, str]:
    """(pixels, caption, source image mode) or Skip."""
    if raw.skip:
        raise Skip(raw.skip)
    caption = decode_caption(raw.caption)
    pixels, mode = decode_image(raw.image, resolution, min_size)
    return pixels, caption, mode
