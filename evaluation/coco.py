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


def choose_prompts(coco: Path, num: int, seed: int = 2014) -> list[str]:
    annotations = read_captions(coco)
    if num > len(annotations):
        raise UserError(f"--num-images {num} is more than the {len(annotations)} captions in {coco / CAPTIONS}")
    return [a["caption"] for a in random.Random(seed).sample(annotations, num)]


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line (empty lines dropped), or a JSON list, or {"prompts": [...]} as written here."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        data = json.loads(text)
        return list(data["prompts"] if isinstance(data, dict) else data)
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def write_prompts(path: Path, prompts: list[str], source: str) -> str:
    digest = prompts_sha256(prompts)
    Path(path).write_text(json.dumps({"source": source, "sha256": digest, "prompts": prompts}, ensure_ascii=False))
    return digest


def reference_images(coco: Path) -> list[Path]:
    folder = Path(coco) / IMAGES
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UserError(f"no reference images in {folder}: --coco must hold {IMAGES}/COCO_val2014_*.jpg")
    return files
