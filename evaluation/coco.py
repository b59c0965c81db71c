"""COCO-2014 validation in its published layout: `annotations/captions_val2014.json` and `val2014/*.jpg`.

The prompt list: `num` captions drawn without replacement with a fixed seed from all annotations sorted by id
(the usual zero-shot FID-30k protocol), written as JSON with its SHA-256 so every run can state what it used.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffusion.errors import UserError

CAPTIONS = Path("annotations") / "captions_val2014.json"
IMAGES = "val2014"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EVAL_SIZE = 256


def prepare_256(image: Image.Image, size: int = EVAL_SIZE) -> np.ndarray:
    """RGB, centre-cropped to a square, PIL LANCZOS to size x size, as uint8 HxWx3 (for every metric)."""
    return np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), Image.LANCZOS, centering=(0.5, 0.5)))


def load_prepared(paths: list[Path]) -> list[np.ndarray]:
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(prepare_256(image))
    return out


def read_captions(coco: Path) -> list[dict]:
    path = Path(coco) / CAPTIONS
    if not path.is_file():
        raise UserError(f"{path} not found: --coco must be the COCO-2014 folder holding {CAPTIONS} and {IMAGES}/")
    annotations = json.loads(path.read_text())["annotations"]
    return sorted(({"id": a["id"], "image_id": a["image_id"], "caption": a["caption"].strip()} for a in annotations),
                  key=lambda a: a["id"])


def choose_annotations(coco: Path, num: int, seed: int = 2014) -> list[dict]:
    """`num` annotations ({id, image_id, caption}) drawn without replacement with `seed` from all, sorted by id."""
    annotations = read_captions(coco)
    if num > len(annotations):
        raise UserError(f"--num-images {num} is more than the {len(annotations)} captions in {coco / CAPTIONS}")
    return random.Random(seed).sample(annotations, num)


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def write_prompts(path: Path, prompts: list[str], source: str, image_ids: list[int] | None = None) -> str:
    """prompts.json: the source, the sha256 of the prompts, the prompts, and their COCO image ids where known."""
    digest = prompts_sha256(prompts)
    record = {"source": source, "sha256": digest, "prompts": prompts}
    if image_ids is not None:
        record["image_ids"] = image_ids
    Path(path).write_text(json.dumps(record, ensure_ascii=False))
    return digest


def reference_images(coco: Path) -> list[Path]:
    folder = Path(coco) / IMAGES
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UserError(f"no reference images in {folder}: --coco must hold {IMAGES}/COCO_val2014_*.jpg")
    return files
