"""Write the student as a pipeline folder in its teacher's layout (the teacher's model_index.json and other
components, the student's UNet), which loads in the teacher's own pipeline class, and `distillation.json` beside
it, which says what the student is and how to sample it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from diffusers import UNet2DConditionModel

from shards.writer import atomic_write_json
from students.recipes import use_recorded_scheduler

DISTILLATION_JSON = "distillation.json"
FORMAT_VERSION = 1
NO_INDEX_PIPELINE = "StableDiffusionPipeline"  # pipeline_class of a path with no model_index.json


def pipeline_class(folder: Path | str) -> str:
    """The diffusers pipeline class a pipeline folder loads in: its model_index.json's `_class_name` (a student
    folder's is its teacher's, copied). A path with no model_index.json (a record's, not on this machine) reads as
    StableDiffusionPipeline, the one layout written before SDXL teachers."""
    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text())["_class_name"] if index.is_file() else NO_INDEX_PIPELINE


def copy_teacher_components(teacher_root: Path, out: Path) -> None:
    """model_index.json and every component but the UNet, copied (symlinks of an HF cache resolved)."""
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((teacher_root / "model_index.json").read_text())
    for name, entry in index.items():
        if name.startswith("_") or name == "unet" or not isinstance(entry, list) or entry[0] is None:
            continue
        shutil.copytree(teacher_root / name, out / name, dirs_exist_ok=True)
    shutil.copyfile(teacher_root / "model_index.json", out / "model_index.json")


def save_student(unet: UNet2DConditionModel, teacher_root: Path, out: Path, record: dict[str, Any]) -> None:
    copy_teacher_components(teacher_root, out)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    use_recorded_scheduler(out, record["inference"])
    load = f'pipe = {pipeline_class(out)}.from_pretrained("{Path(out).resolve()}")'
    write_record(out, {**record, "inference": with_stock_code(record["inference"], load)})


def with_stock_code(inference: dict[str, Any], load: str) -> dict[str, Any]:
    """The inference recipe with "diffusers": the python that samples the student in stock diffusers, the
    lines that make `pipe` then the recipe's call (recipes that write their own code are kept as they are)."""
    if "call" not in inference or "diffusers" in inference:
        return inference
    return {**inference, "diffusers": f"{load}\n{inference['call']}"}


def write_record(out: Path, record: dict[str, Any]) -> None:
    """distillation.json (atomically), with this format's version, and the model card made from it."""
    from students.card import write_model_card  # here, not at the top: students.card imports this module

    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out) / DISTILLATION_JSON, {"format_version": FORMAT_VERSION, **record})
    write_model_card(out)


def read_distillation(folder: Path) -> dict[str, Any] | None:
    """The record of a distilled student, or None for a plain (teacher) pipeline folder."""
    path = Path(folder) / DISTILLATION_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def inference_recipe(method: str, guidance_scale: float | None, w_range: tuple[float, float] | None,
                     pipeline: str = NO_INDEX_PIPELINE) -> dict:
    """How to sample the student with `pipeline` (its teacher's class: pipeline_class): one UNet pass per step in
    every case."""
    if method == "w-distill":
        return {
            "pipeline": pipeline,
            "guidance_scale": "any w in w_range; the pipeline feeds it to the UNet as timestep_cond",
            "w_range": list(w_range),
            "unet_passes_per_step": 1,
            "call": f"image = pipe(prompt, guidance_scale=w).images[0]  # any w in {list(w_range)}",
        }
    return {"pipeline": pipeline, "guidance_scale": 1.0, "unet_passes_per_step": 1,
            "distilled_guidance_scale": guidance_scale, "call": "image = pipe(prompt, guidance_scale=1.0).images[0]"}
