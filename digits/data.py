"""The digits world's data: scikit-learn's 1,797 handwritten digits (8x8, 0..16), upscaled to RGB images in random
ink and background colours, split into disjoint train and evaluation sets, written in the real formats:
- an img2dataset-style LAION source (tars of KEY.png + KEY.txt + KEY.json) from the train split;
- a COCO-2014-style evaluation set (annotations/captions_val2014.json + val2014/COCO_val2014_%012d.jpg).
"""

from __future__ import annotations

import colorsys
import io
import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}", "the number {digit} written by hand", "a photo of the digit {digit}",
    "handwritten {digit}", "{word}, written by hand", "a scan of a handwritten {word}",
    "the digit {word} in white ink on black", "a {word}", "number {digit}",
)
RESOLUTION = 32
EVAL_FRACTION = 0.2
SPLIT_SEED = 0
_DIGIT = re.compile(r"\b(" + "|".join(WORDS) + r"|[0-9])\b", re.IGNORECASE)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 in [0, 1], labels N) from scikit-learn, which ships them (no download)."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def split(labels: np.ndarray, eval_fraction: float = EVAL_FRACTION, seed: int = SPLIT_SEED):
    """Disjoint (train indices, eval indices), stratified by digit, fixed by the seed."""
    rng = random.Random(seed)
    train, evaluation = [], []
    for digit in range(10):
        members = [int(i) for i in np.flatnonzero(labels == digit)]
        rng.shuffle(members)
        cut = round(len(members) * eval_fraction)
        evaluation += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(evaluation)


def colours(rng: random.Random) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(ink, background) RGB in [0, 1]: a bright ink of any hue on a dark background of any hue. Captions never
    name colours, so colour is free variation that guidance (blue tone) can steer."""
    ink = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.8, 1.0))
    background = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.3))
    return ink, background


def to_image(pixels: np.ndarray, size: int = RESOLUTION, rng: random.Random | None = None) -> Image.Image:
    """An 8x8 digit in [0, 1] as a size x size RGB image, bicubic-upscaled; white on black without `rng`, else
    in the colours `colours(rng)` draws."""
    small = Image.fromarray((pixels * 255).round().astype(np.uint8), mode="L")
    ink_amount = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32)[..., None] / 255.0
    ink, background = colours(rng) if rng is not None else ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    rgb = np.asarray(background) * (1 - ink_amount) + np.asarray(ink) * ink_amount
    return Image.fromarray((rgb * 255).round().clip(0, 255).astype(np.uint8), mode="RGB")


def caption(digit: int, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(word=WORDS[digit], digit=digit)


def prompt_list() -> list[str]:
    """Every caption template for every digit: the prompt file of data-free distillation (no images)."""
    return [template.format(word=WORDS[digit], digit=digit) for digit in range(10) for template in TEMPLATES]


def digit_in(text: str) -> int | None:
    """The digit a caption names (word or numeral), or None."""
    match = _DIGIT.search(text)
    if match is None:
        return None
    token = match.group(1).lower()
    return int(token) if token.isdigit() else WORDS.index(token)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_laion_source(folder: Path, images, labels, indices, captions_per_image: int = 2, per_tar: int = 500,
                       seed: int = 0) -> Path:
    """img2dataset layout: 00000.tar, ... holding KEY.png, KEY.txt, KEY.json (several captions per image)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries = [(i, c) for i in indices for c in range(captions_per_image)]
    rng.shuffle(entries)
    for start in range(0, len(entries), per_tar):
        with wds.TarWriter(str(folder / f"{start // per_tar:05d}.tar")) as tar:
            for number, (index, copy) in enumerate(entries[start:start + per_tar], start):
                digit = int(labels[index])
                text = caption(digit, rng)
                image = to_image(images[index], rng=rng)
                tar.write({"__key__": f"{start // per_tar:05d}{number:05d}", "png": _png(image),
                           "txt": text, "json": json.dumps({"digit": digit, "sklearn_index": index, "copy": copy})})
    return folder


def write_coco_eval(folder: Path, images, labels, indices, seed: int = 1) -> Path:
    """COCO-2014 layout: one JPEG per evaluation digit and two captions each."""
    rng = random.Random(seed)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "val2014").mkdir(exist_ok=True)
    annotations, image_entries = [], []
    for index in indices:
        image_id = 100000 + index
        name = f"COCO_val2014_{image_id:012d}.jpg"
        to_image(images[index], rng=rng).save(folder / "val2014" / name, quality=95)
        image_entries.append({"id": image_id, "file_name": name, "width": RESOLUTION, "height": RESOLUTION})
        for _ in range(2):
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption(int(labels[index]), rng)})
    (folder / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": image_entries, "annotations": annotations}))
    return folder
