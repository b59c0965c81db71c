"""Build (or reuse) the digits world under one folder:

    WORLD/source/       img2dataset-style LAION tars from the train split (2 captions per digit image)
    WORLD/coco/         COCO-2014-style evaluation set from the disjoint evaluation split
    WORLD/teacher/      the trained StableDiffusionPipeline teacher
    WORLD/classifier/   the digit classifier (digit-FID / digit-CLIP / PR features) and its held-out accuracy
    WORLD/world.json    what was built, with which recipe, how long it took

Each part is reused when world.json says it was built with the same recipe; delete a folder to rebuild it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from digits.classifier import train_classifier
from digits.data import load_digits, split, to_image, write_coco_eval, write_laion_source
from digits.teacher import TeacherRecipe, train_teacher


@dataclass
class WorldRecipe:
    teacher: TeacherRecipe = field(default_factory=TeacherRecipe)
    classifier_epochs: int = 15
    captions_per_image: int = 2
    teacher_colourings: int = 4  # colourings of each train image the teacher sees

    def part(self, name: str) -> dict:
        if name == "teacher":
            return {**asdict(self.teacher), "colourings": self.teacher_colourings}
        if name == "classifier":
            return {"epochs": self.classifier_epochs}
        return {"captions_per_image": self.captions_per_image}


FAST = WorldRecipe(TeacherRecipe(vae_steps=15, unet_steps=15, batch_size=32, vae_batch_size=16), classifier_epochs=1)


@dataclass
class World:
    root: Path
    info: dict

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def coco(self) -> Path:
        return self.root / "coco"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def classifier(self) -> Path:
        return self.root / "classifier"


def _arrays(images: np.ndarray, indices: list[int], copies: int = 1, seed: int = 0) -> list[np.ndarray]:
    """`copies` colourings of each image (in index order, copy-major)."""
    rng = random.Random(seed)
    return [np.asarray(to_image(images[i], rng=rng)) for _ in range(copies) for i in indices]


def build_world(root: str | Path, recipe: WorldRecipe | None = None, log=print) -> World:
    recipe = recipe or WorldRecipe()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info_path = root / "world.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    images, labels = load_digits()
    train, evaluation = split(labels)
    world = World(root, info)

    def fresh(name: str, *folders: Path) -> bool:
        done = info.get(name, {}).get("recipe") == recipe.part(name) and all(f.exists() for f in folders)
        if not done:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            log(f"digits world: building {name} in {', '.join(map(str, folders))}")
        return not done

    def record(name: str, start: float, **extra) -> None:
        info[name] = {"recipe": recipe.part(name), "seconds": round(time.perf_counter() - start, 1), **extra}
        info_path.write_text(json.dumps(info, indent=2))

    if fresh("data", world.source, world.coco):
        start = time.perf_counter()
        write_laion_source(world.source, images, labels, train, recipe.captions_per_image)
        write_coco_eval(world.coco, images, labels, evaluation)
        record("data", start, train_images=len(train), eval_images=len(evaluation),
               train_records=len(train) * recipe.captions_per_image)
    if fresh("classifier", world.classifier):
        start = time.perf_counter()
        result = train_classifier(_arrays(images, train, 2), np.tile(labels[train], 2),
                                  _arrays(images, evaluation, seed=1), labels[evaluation], world.classifier,
                                  recipe.classifier_epochs)
        record("classifier", start, heldout_accuracy=result["heldout_accuracy"])
    if fresh("teacher", world.teacher):
        start = time.perf_counter()
        arrays = _arrays(images, train, recipe.teacher_colourings, seed=2)
        pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
        result = train_teacher(pixels, np.tile(labels[train], recipe.teacher_colourings), world.teacher, recipe.teacher)
        record("teacher", start, vae_scaling_factor=result["vae_scaling_factor"])
    return world
