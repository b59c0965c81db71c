"""How far a student's eps is from the guided target on records it never saw, next to where it started.

The baseline is the teacher's unguided prediction stored in the shards (eps_cond for CFG, eps for classifier
guidance): the student starts there, so error(student) / error(baseline) < 1 means the guidance was learned.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusion.guidance import cfg_combine, classifier_guided_eps
from diffusion.unet import is_w_conditioned, unet_eps
from shards.reader import ShardStream


def _records(shards: Path, limit: int) -> dict[str, object]:
    stream = ShardStream(shards, shuffle_buffer=1, resampled=False)
    items = list(itertools.islice(iter(stream), limit))
    batch = {k: torch.stack([item[k] for item in items]).float() for k in items[0] if k not in ("key", "caption", "meta")}
    batch["t"] = batch["t"].long()
    batch["caption"] = [item["caption"] for item in items]
    return batch


@torch.no_grad()
def heldout_errors(student_dir: str | Path, shards: str | Path, teacher, scale: float, limit: int = 64) -> dict:
    """{"student": mse, "baseline": mse, "ratio": student / baseline} at guidance scale (alpha, gamma or w)."""
    unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet", local_files_only=True).eval()
    batch = _records(Path(shards), limit)
    z_t, t, text = batch["zt"], batch["t"], teacher.encode_text(batch["caption"])
    if "eps_cond" in batch:
        baseline, target = batch["eps_cond"], cfg_combine(batch["eps_uncond"], batch["eps_cond"], scale)
    else:
        baseline = batch["eps"]
        target = classifier_guided_eps(batch["eps"], batch["grad"], teacher.schedule.beta(t, z_t), scale)
    w = torch.full((len(t),), float(scale)) if is_w_conditioned(unet) else None
    eps = unet_eps(unet, teacher.schedule, z_t, t, text.to(unet.dtype), guidance_scale=w)
    student_error = (eps - target).pow(2).mean().item()
    baseline_error = (baseline - target).pow(2).mean().item()
    return {"student": student_error, "baseline": baseline_error, "ratio": student_error / baseline_error}
