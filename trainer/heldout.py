"""How far a student's eps is from the guided target on records it never saw, next to where it started.

The baseline is the teacher's unguided prediction stored in the shards (eps_cond for CFG, eps for classifier
guidance): the student starts there, so error(student) / error(baseline) < 1 means the guidance was learned.
Where the guidance correction is tiny next to the student's own error (a weak classifier gradient), the ratio
says little; `guidance_learned` still measures the move along the correction.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from diffusion.guidance import DEFAULT_COEFFICIENT, cfg_combine, classifier_guided_eps, guidance_coefficient
from diffusion.teacher import load_unet
from diffusion.unet import is_w_conditioned, unet_eps
from shards.format import recorded_micro
from shards.reader import ShardStream
from students.folder import read_distillation


def _records(shards: Path, limit: int) -> dict[str, object]:
    stream = ShardStream(shards, shuffle_buffer=1, resampled=False)
    items = list(itertools.islice(iter(stream), limit))
    batch = {k: torch.stack([item[k] for item in items]).float() for k in items[0] if k not in ("key", "caption", "meta")}
    batch["t"] = batch["t"].long()
    batch["caption"] = [item["caption"] for item in items]
    batch["micro"] = recorded_micro([item["meta"] for item in items])
    return batch


@torch.no_grad()
def heldout_errors(student_dir: str | Path, shards: str | Path, teacher, scale: float, limit: int = 64) -> dict:
    """Errors at guidance scale `scale` (alpha, gamma or w): "student" and "baseline" MSE to the target, their
    "ratio", and "guidance_learned" = <eps_student - baseline, target - baseline> / ||target - baseline||^2:
    the share of the guidance correction the student has taken on (0 where it started, 1 when it matches)."""
    unet = load_unet(student_dir).eval()
    batch = _records(Path(shards), limit)
    z_t, t, text = batch["zt"], batch["t"], teacher.encode_text(batch["caption"]).with_micro(batch["micro"])
    if "eps_cond" in batch:
        baseline, target = batch["eps_cond"], cfg_combine(batch["eps_uncond"], batch["eps_cond"], scale)
    else:
        baseline = batch["eps"]
        record = read_distillation(Path(student_dir)) or {}
        convention = record.get("guidance_coefficient") or DEFAULT_COEFFICIENT  # the one the student trained with
        c_t = guidance_coefficient(teacher.schedule, t, z_t, convention)
        target = classifier_guided_eps(batch["eps"], batch["grad"], c_t, scale)
    w = torch.full((len(t),), float(scale)) if is_w_conditioned(unet) else None
    eps = unet_eps(unet, teacher.schedule, z_t, t, text, guidance_scale=w)
    student_error = (eps - target).pow(2).mean().item()
    baseline_error = (baseline - target).pow(2).mean().item()
    correction = target - baseline
    learned = ((eps - baseline) * correction).sum() / correction.pow(2).sum()
    return {"student": student_error, "baseline": baseline_error, "ratio": student_error / baseline_error,
            "guidance_learned": learned.item()}
