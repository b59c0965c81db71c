"""Progressive distillation: time per round iteration against the bare student step, interleaved in one run.

bare: the w-student's forward + x0 loss + backward + the same fused AdamW step (buffers freed, the default) on one
in-memory batch (w embedding included).
forward: one forward of the same UNet on the same batch, without gradient (what each teacher step costs).
round: a `trainer fit --method progressive` step inside its loop (shard streaming, caption encoding, the
teacher's two DDIM steps, the student's step; checkpoints excluded), timed by the loop (`after_step`).
After each round step, bare and forward run in rotating order; ratios are over blocks of turns (the first
left out), median [min-max]. The floor is what the round must cost at least: 1 + 2 forward / bare; the
ratio round / bare is reported beside it (about 1 + 2/3 if a backward costs two forwards).

    python benchmarks/progressive.py [--samples 128] [--batch-size 8] [--resolution 128] [--steps 40] [--blocks 4]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch
from accelerate.state import AcceleratorState

from diffusion.samplers import grid_coefficients
from diffusion.teacher import load_teacher
from diffusion.unet import unet_eps
from evaluation.timing import Turns, ratio
from shards.reader import ShardStream
from trainer.config import FitConfig, ProgressiveConfig
from trainer.fit import run_fit
from trainer.optim import clear_gradients, make_adam
from trainer.progressive import run_progressive

from figures import build_shard_world, emit, shard_world_options  # benchmarks/figures.py: the scripts run from benchmarks/


def bare_contenders(student_dir: Path, shards: Path, batch_size: int) -> dict:
    """{"bare": one student step, "forward": one no-grad forward} on one in-memory batch at t = 999."""
    from diffusers import UNet2DConditionModel

    teacher = load_teacher(student_dir, with_unet_and_vae=False)
    sample = next(iter(ShardStream(shards, shuffle_buffer=1)))
    z0 = sample["z0"].unsqueeze(0).expand(batch_size, *sample["z0"].shape).float()
    text = teacher.encode_text([sample["caption"]] * batch_size)
    t, w = torch.full((batch_size,), 999), torch.full((batch_size,), 3.0)
    a, sigma = grid_coefficients(teacher.schedule, t, z0)
    z_t = a * z0 + sigma * torch.randn_like(z0)
    student = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet").train()
    optimizer = make_adam(student.parameters(), decoupled=True, lr=1e-5, betas=(0.9, 0.999), eps=1e-8)

    def step() -> None:
        eps = unet_eps(student, teacher.schedule, z_t, t, text, guidance_scale=w)
        ((z_t - sigma * eps) / a - z0).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        clear_gradients(optimizer, False)

    def forward() -> None:
        with torch.no_grad():
            unet_eps(student, teacher.schedule, z_t, t, text, guidance_scale=w)

    step(), forward()  # warm-up
    return {"bare": step, "forward": forward}


@click.command()
@shard_world_options(samples=128, steps=40)
def main(samples: int, batch_size: int, resolution: int, steps: int, blocks: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir, shards = build_shard_world(tmp, samples, resolution, store_clean=True)
        run_fit(FitConfig(method="w-distill", teacher=str(teacher_dir), shards=str(shards), out=str(tmp / "w"),
                          max_steps=1, ema_decay=0.0, report_to="none", w_min=1.0, w_max=6.0))
        AcceleratorState._reset_state(reset_partial_state=True)
        turns = Turns(bare_contenders(tmp / "w", shards, batch_size))
        run_progressive(ProgressiveConfig(
            student=str(tmp / "w"), shards=str(shards), out=str(tmp / "prog"), start_steps=2, end_steps=1,
            iters_per_round=steps, batch_size=batch_size, ema_decay=0.0, report_to="none", num_workers=0,
            checkpoint_every=steps), after_step=turns.between("round"))
    forward = ratio(turns.seconds["forward"], turns.seconds["bare"], blocks)
    figures = {
        "batch_size": batch_size, "resolution": resolution, "steps": steps, "threads": torch.get_num_threads(),
        "forward_time_over_bare_step": forward,
        "floor_bare_plus_two_forwards": 1 + 2 * forward.median,
        "round_time_over_bare_step": ratio(turns.seconds["round"], turns.seconds["bare"], blocks),
    }
    emit(figures, json_out)


if __name__ == "__main__":
    main()
