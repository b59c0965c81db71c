"""The prompts an evaluation renders: a seeded draw of COCO-2014 captions (the default), or a fixed list in a file.

A fixed list is how published tables are made comparable. GigaGAN's evaluation (github.com/mingukkang/GigaGAN,
`evaluation/data_util.py`) renders the 30k captions of its `captions.txt`, one per line, image i from line i; the
SiD-LSG README points to that same file for its zero-shot COCO-2014 FID. The accepted files (text, csv/tsv,
parquet, JSON; UTF-8 or UTF-16) are `diffusion.prompt_files`'; their sha256 and counts go into the run's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffusion.errors import UserError
from diffusion.prompt_files import read_prompt_file

COCO_DRAW_SEED = 2014  # the default: captions drawn without replacement from all annotations sorted by id
COCO_DEFAULT_COUNT = 30000


@dataclass
class PromptSelection:
    """The prompts in render order, their COCO image ids where known, and what the protocol records of them."""

    prompts: list[str]
    source: str
    image_ids: list[int] | None = None
    info: dict = field(default_factory=dict)


def read_prompt_list(path: str | Path, column: str = "caption") -> PromptSelection:
    """Every caption of a prompt file in order, with its image ids if the file has them (diffusion.prompt_files)."""
    listed = read_prompt_file(path, column)
    return PromptSelection(listed.prompts, str(path), listed.image_ids, listed.info)


def first_prompts(selection: PromptSelection, num: int | None) -> PromptSelection:
    """The first `num` prompts of a file (all of them when num is None); a file with fewer is an error."""
    if num is None:
        return selection
    if num > len(selection.prompts):
        raise UserError(f"--prompts {selection.source} holds {len(selection.prompts)} prompts, fewer than "
                        f"--num-images {num}")
    ids = selection.image_ids[:num] if selection.image_ids is not None else None
    return PromptSelection(selection.prompts[:num], selection.source, ids, dict(selection.info))


def _normal(caption: str) -> str:
    return " ".join(caption.lower().split())


def coco_match(selection: PromptSelection, coco: Path) -> dict:
    """How many of the listed captions (lower-cased, whitespace collapsed) and image ids are in COCO-2014's
    annotations: a check that a list is the COCO-2014 list it claims to be. It does not change the references."""
    from evaluation.coco import read_captions

    annotations = read_captions(coco)
    captions = {_normal(a["caption"]) for a in annotations}
    out = {"captions_in_coco": sum(_normal(c) in captions for c in selection.prompts)}
    if selection.image_ids is not None:
        ids = {a["image_id"] for a in annotations}
        out["image_ids_in_coco"] = sum(i in ids for i in selection.image_ids)
    return out


def coco_draw(coco: Path, num: int | None) -> PromptSelection:
    """The default: `num` (30000) captions drawn with seed 2014 from all COCO-2014 val annotations sorted by id."""
    from evaluation.coco import CAPTIONS, choose_annotations

    chosen = choose_annotations(coco, COCO_DEFAULT_COUNT if num is None else num, COCO_DRAW_SEED)
    source = f"{coco}/{CAPTIONS.as_posix()}"
    info = {"kind": "coco-draw", "path": source, "seed": COCO_DRAW_SEED, "image_ids": True}
    return PromptSelection([a["caption"] for a in chosen], source, [a["image_id"] for a in chosen], info)


def select_prompts(coco: str | None, prompts: str | None, num_images: int | None,
                   column: str = "caption") -> PromptSelection:
    """--prompts FILE (its first --num-images, default all) if given, else the seeded draw from --coco."""
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    if prompts:
        selection = first_prompts(read_prompt_list(prompts, column), num_images)
        if coco:
            selection.info.update(coco_match(selection, Path(coco)))
        return selection
    if not coco:
        raise UserError("pass --coco DIR (COCO-2014 captions) or --prompts FILE")
    return coco_draw(Path(coco), num_images)
