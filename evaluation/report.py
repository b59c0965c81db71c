"""report.md and an image grid for one evaluation run."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from evaluation.render import image_path

GRID_IMAGES = 16


def image_grid(paths: list[Path], columns: int = 4, side: int = 128) -> Image.Image:
    rows = math.ceil(len(paths) / columns)
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            grid.paste(image.convert("RGB").resize((side, side), Image.LANCZOS), ((i % columns) * side, (i // columns) * side))
    return grid


def markdown_table(header: list[str], rows: list[list], float_format: str = ".4g") -> list[str]:
    """A Markdown table as lines; floats in `float_format`, None as an empty cell."""
    def cell(value) -> str:
        return "" if value is None else (format(value, float_format) if isinstance(value, float) else str(value))

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def write_report(out: Path, record: dict, prompts: list[str]) -> Path:
    count = min(GRID_IMAGES, len(prompts))
    image_grid([image_path(out, i) for i in range(count)]).save(out / "grid.png")
    protocol = record["protocol"]
    names = [k for k in ("fid", "clip_score", "precision", "recall") if k in record]
    lines = [
        f"# Evaluation: {record['model']['label']}", "",
        f"{protocol['num_images']} images at {protocol['resolution']} px, {protocol['num_inference_steps']} steps, "
        f"seed {protocol['seed']} (+ prompt index); prompts sha256 {protocol['prompts_sha256'][:16]}.", "",
        *markdown_table(names, [[record[k] for k in names]], ".4f"), "",
        f"Rendering: {record['render']['rendered']} images in {record['render']['seconds']:.1f}s on rank 0 "
        f"({record['render']['skipped']} already on disk).", "",
        "![first images](grid.png)", "",
    ]
    lines += [f"{i}. {prompts[i]}" for i in range(count)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
