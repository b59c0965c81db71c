"""What `trainer fit` does with an OUT that already holds a run: continue it (--resume), start over
(--overwrite: what the earlier run wrote is removed first) or refuse, so that a re-run never overwrites a finished
student or mixes its checkpoints with another run's. Every loop calls `prepare_out` before loading any model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from diffusion.errors import UserError
from students.card import CARD
from students.folder import DISTILLATION_JSON
from students.lora import EMBEDDING_FILE, KOHYA_FILE, LORA_FILE
from trainer.checkpoint import checkpoint_entries

LOGS, SAMPLES, MODEL_INDEX = "logs", "samples", "model_index.json"
_ROUND = re.compile(r"^round-\d{2,}steps$")


def round_folders(out: Path) -> list[Path]:
    """Progressive's `round-NNsteps/` folders in OUT."""
    return sorted(p for p in out.iterdir() if p.is_dir() and _ROUND.match(p.name)) if out.is_dir() else []


def earlier_run(out: Path) -> str | None:
    """What OUT holds of an earlier run, in words, or None when it holds none."""
    held = []
    if entries := checkpoint_entries(out):
        held.append(f"checkpoints up to step {entries[-1][0]}")
    if (out / DISTILLATION_JSON).is_file():
        held.append("a finished student")
    if rounds := round_folders(out):
        held.append(f"finished rounds {', '.join(p.name for p in rounds)}")
    return " and ".join(held) or None


def check_out(out: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start afresh in an OUT that holds a run, unless told to continue it or start over; refuse
    always a pipeline folder no run wrote (--out given the teacher's folder: the export would replace its UNet)."""
    if (out / MODEL_INDEX).is_file() and not (out / DISTILLATION_JSON).is_file() and not earlier_run(out):
        raise UserError(f"{out} is a pipeline folder that no `trainer fit` run wrote (a teacher?); use another --out")
    if not resume and not overwrite and (held := earlier_run(out)):
        raise UserError(f"{out} holds a run ({held}); pass --resume latest to continue it or --overwrite to "
                        "start over")


def _student_paths(out: Path) -> list[Path]:
    """The student `trainer fit` exported into OUT: distillation.json, its model card, a LoRA student's adapter
    files, model_index.json and the component folders it names (the UNet and the teacher's copied components).
    Nothing without distillation.json."""
    if not (out / DISTILLATION_JSON).is_file():
        return []
    try:
        index = json.loads((out / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        index = {}
    names = {"unet"} | {k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")
                        and Path(k).name == k}
    files = (DISTILLATION_JSON, CARD, LORA_FILE, KOHYA_FILE, EMBEDDING_FILE, MODEL_INDEX)
    return [*(out / name for name in files), *(out / name for name in sorted(names))]


def written_by_a_run(out: Path) -> list[Path]:
    """Everything in OUT that a `trainer fit` run writes: checkpoints (also interrupted ones), logs, sample grids,
    progressive's round folders and the exported student."""
    paths = [p for _, p in checkpoint_entries(out)] + [out / LOGS] + round_folders(out) + _student_paths(out)
    paths += sorted((out / SAMPLES).glob("kimg-*.png")) + sorted((out / SAMPLES).glob("step-*.png"))
    return [p for p in paths if p.exists()]


def refuse_removing_inputs(paths: list[Path], inputs) -> None:
    """--overwrite never removes what the run reads (a --student round folder or a teacher inside OUT)."""
    for given in filter(None, inputs):
        if not Path(given).exists():
            continue  # a hub id, or a file the run will refuse itself
        source = Path(given).resolve()
        for path in paths:
            target = path.resolve()
            if source == target or target in source.parents or source in target.parents:
                raise UserError(f"--overwrite would remove {path}, and the run reads {given}: use another --out")


def prepare_out(cfg, accelerator, inputs=()) -> None:
    """Refuse an OUT that holds a run unless --resume or --overwrite; under --overwrite, remove what the earlier
    run wrote. Every rank checks the same files; the main process removes them while the others wait."""
    out = Path(cfg.out)
    check_out(out, cfg.resume, cfg.overwrite)
    if not cfg.overwrite:
        return
    held, paths = earlier_run(out), written_by_a_run(out)
    refuse_removing_inputs(paths, inputs)
    accelerator.wait_for_everyone()  # every rank has looked before anything goes
    if accelerator.is_main_process and paths:
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        accelerator.print(f"--overwrite: removed what an earlier run left in {out} ({held or 'its logs'})")
    accelerator.wait_for_everyone()
