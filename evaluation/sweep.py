"""`evaluation sweep`: the teacher across CFG scales and students as points, CLIP score against FID (the seed's
Figures 2 and 7), written as sweep.csv and sweep.png. Each point is a full render + score on the same prompts."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from evaluation.models import ModelSpec, describe_model, with_variant


def teacher_points(teacher: str, scales: list[float]) -> list[ModelSpec]:
    return [describe_model(teacher, scale) for scale in scales]


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "kind", "guidance_scale", "fid", "clip_score"])
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in writer.fieldnames} for row in rows)


def plot(rows: list[dict], path: Path, fid_name: str = "FID", clip_name: str = "CLIP score") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    teacher = [r for r in rows if r["kind"] == "teacher"]
    axis.plot([r["clip_score"] for r in teacher], [r["fid"] for r in teacher], "o-", color="tab:blue",
              label="teacher, CFG scales")
    for r in teacher:
        axis.annotate(f"{r['guidance_scale']:g}", (r["clip_score"], r["fid"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    for r in (r for r in rows if r["kind"] != "teacher"):
        axis.plot(r["clip_score"], r["fid"], "*", markersize=12, label=r["label"])
    axis.set_xlabel(clip_name)
    axis.set_ylabel(fid_name)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_sweep(cfg, teacher: str, scales: list[float], students: list[str]) -> list[dict] | None:
    """Every point rendered into OUT/<label>/ and scored with FID and CLIP; rank 0 writes sweep.csv/png."""
    import torch
    from accelerate import PartialState

    from evaluation.coco30k import build_evaluators, evaluate_spec, load_prompt_list
    from evaluation.models import parse_model_arg

    specs = with_variant(teacher_points(teacher, scales), cfg.variant) + [parse_model_arg(s) for s in students]
    prompts, source = load_prompt_list(cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    evaluators = build_evaluators(cfg, ["fid", "clip"], state.device) if state.is_main_process else {}
    rows = []
    for spec in specs:
        record = evaluate_spec(spec, prompts, source, Path(cfg.out) / slug(spec.label), cfg, evaluators, state)
        if record is not None:
            rows.append({"label": spec.label, "kind": spec.kind, "guidance_scale": spec.guidance_scale,
                         "fid": record["fid"], "clip_score": record["clip_score"]})
    if not state.is_main_process:
        return None
    write_csv(rows, Path(cfg.out) / "sweep.csv")
    plot(rows, Path(cfg.out) / "sweep.png")
    return rows
