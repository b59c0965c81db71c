"""`trainer fit` throughput against the bare student step, measured side by side in one run.

bare: the student's forward + loss + backward + AdamW step on one batch of tensors already in memory
(text embeddings included), the same model, batch size and loss; nothing else.
trainer: `trainer fit` steps/s inside its loop: shard streaming and decoding, caption encoding (cached),
the same step, the cross-rank agreement on finite losses, progress and logging (checkpoints excluded);
with 0 and 1 DataLoader workers (on 2 cores a worker takes CPU from the step), and with EMA. Each ratio is
given over the whole run and after the first step (which starts the data loader: a cost paid once per pass).

    python benchmarks/fit.py [--samples 256] [--batch-size 8] [--resolution 128] [--steps 60]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch
from accelerate.state import AcceleratorState

from diffusion.teacher import load_teacher
from diffusion.unet import unet_eps
from shards.reader import ShardStream
from trainer.config import FitConfig
from trainer.fit import build_student, run_fit
from trainer.losses import cfg_distill_loss

from figures import build_shard_world, emit, shard_world_options  # benchmarks/figures.py: the scripts run from benchmarks/


def bare_student_rate(cfg: FitConfig, shards: Path, steps: int) -> float:
    """Optimiser steps/s on one in-memory batch."""
    teacher = load_teacher(cfg.teacher, with_unet_and_vae=False)
    sample = next(iter(ShardStream(shards, shuffle_buffer=1)))
    batch = {k: v.unsqueeze(0).expand(cfg.batch_size, *v.shape).float() for k, v in sample.items()
             if isinstance(v, torch.Tensor) and v.ndim == 3}
    t = sample["t"].repeat(cfg.batch_size)
    text = teacher.encode_text([sample["caption"]] * cfg.batch_size)
    student = build_student(cfg, teacher.root)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)

    def step() -> None:
        eps = unet_eps(student, teacher.schedule, batch["zt"], t, text)
        cfg_distill_loss(eps, batch["eps_cond"], batch["eps_uncond"], cfg.guidance_scale).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def trainer_rates(cfg: FitConfig) -> tuple[float, float]:
    """(steps/s over the whole run, steps/s after the first step, which starts the data loader)."""
    seconds = run_fit(cfg)["step_seconds"]
    AcceleratorState._reset_state(reset_partial_state=True)
    return len(seconds) / sum(seconds), (len(seconds) - 1) / sum(seconds[1:])


@click.command()
@shard_world_options(samples=256, steps=60)
def main(samples: int, batch_size: int, resolution: int, steps: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir, _ = build_shard_world(tmp, samples, resolution)
        cfg = dict(method="cfg-distill", teacher=str(teacher_dir), shards=str(tmp / "shards"), batch_size=batch_size,
                   max_steps=steps, lr_warmup_steps=0, ema_decay=0.0, report_to="none", checkpoint_every=steps)
        bare = [bare_student_rate(FitConfig(out=str(tmp / "bare"), **cfg), tmp / "shards", steps)]
        runs = {
            "workers0": trainer_rates(FitConfig(out=str(tmp / "w0"), num_workers=0, **cfg)),
            "workers1": trainer_rates(FitConfig(out=str(tmp / "w1"), num_workers=1, **cfg)),
            "workers0_ema": trainer_rates(FitConfig(out=str(tmp / "ema"), num_workers=0, **{**cfg, "ema_decay": 0.9999})),
        }
        bare.append(bare_student_rate(FitConfig(out=str(tmp / "bare"), **cfg), tmp / "shards", steps))
        mean_bare = sum(bare) / len(bare)
        figures = {
            "samples": samples, "batch_size": batch_size, "resolution": resolution, "steps": steps,
            "threads": torch.get_num_threads(), "bare_steps_per_s": mean_bare,
            "bare_spread": abs(bare[0] - bare[1]) / mean_bare,
        }
        for name, (whole, steady) in runs.items():
            figures[f"ratio_{name}"] = whole / mean_bare
            figures[f"ratio_{name}_after_first_step"] = steady / mean_bare
    emit(figures, json_out)


if __name__ == "__main__":
    main()
