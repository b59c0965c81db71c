"""Progressive distillation: time per round iteration against the bare student step, side by side in one run.

bare: the w-student's forward + x0 loss + backward + AdamW step on one in-memory batch (w embedding included).
forward: one forward of the same UNet on the same batch, without gradient (what each teacher step costs).
round: `trainer fit --method progressive` steps/s inside its loop (shard streaming, caption encoding, the
teacher's two DDIM steps, the student's step; checkpoints excluded).
The floor is what the round must cost at least: (bare + 2 forward) / bare, measured; the ratio round / bare
is reported beside it (about 1 + 2/3 if a backward costs two forwards).

    python benchmarks/progressive.py [--samples 128] [--batch-size 8] [--resolution 128] [--steps 40]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch
from accelerate.state import AcceleratorState

from diffusion.samplers import grid_coefficients
from diffusion.teacher import load_teacher
from diffusion.unet import unet_eps
from shards.reader import ShardStream
from trainer.config import FitConfig, ProgressiveConfig
from trainer.fit import run_fit
from trainer.progressive import run_progressive

from figures import build_shard_world, emit, shard_world_options  # benchmarks/figures.py: the scripts run from benchmarks/


def bare_rates(student_dir: Path, shards: Path, batch_size: int, steps: int) -> tuple[float, float]:
    """(student steps/s, no-grad forwards/s) on one in-memory batch at t = 999."""
    from diffusers import UNet2DConditionModel

    teacher = load_teacher(student_dir, with_unet_and_vae=False)
    sample = next(iter(ShardStream(shards, shuffle_buffer=1)))
    z0 = sample["z0"].unsqueeze(0).expand(batch_size, *sample["z0"].shape).float()
    text = teacher.encode_text([sample["caption"]] * batch_size)
    t, w = torch.full((batch_size,), 999), torch.full((batch_size,), 3.0)
    a, sigma = grid_coefficients(teacher.schedule, t, z0)
    z_t = a * z0 + sigma * torch.randn_like(z0)
    student = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet").train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step() -> None:
        eps = unet_eps(student, teacher.schedule, z_t, t, text, guidance_scale=w)
        ((z_t - sigma * eps) / a - z0).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.no_grad():
            unet_eps(student, teacher.schedule, z_t, t, text, guidance_scale=w)

    rates = []
    for fn in (step, forward):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        rates.append(steps / (time.perf_counter() - start))
    return rates[0], rates[1]


@click.command()
@shard_world_options(samples=128, steps=40)
def main(samples: int, batch_size: int, resolution: int, steps: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir, shards = build_shard_world(tmp, samples, resolution, store_clean=True)
        run_fit(FitConfig(method="w-distill", teacher=str(teacher_dir), shards=str(shards), out=str(tmp / "w"),
                          max_steps=1, ema_decay=0.0, report_to="none", w_min=1.0, w_max=6.0))
        AcceleratorState._reset_state(reset_partial_state=True)
        bare = [bare_rates(tmp / "w", shards, batch_size, steps)]
        seconds = run_progressive(ProgressiveConfig(
            student=str(tmp / "w"), shards=str(shards), out=str(tmp / "prog"), start_steps=2, end_steps=1,
            iters_per_round=steps, batch_size=batch_size, ema_decay=0.0, report_to="none", num_workers=0,
            checkpoint_every=steps))["step_seconds"]
        bare.append(bare_rates(tmp / "w", shards, batch_size, steps))
    step_rate = sum(b[0] for b in bare) / 2
    forward_rate = sum(b[1] for b in bare) / 2
    round_rate = (len(seconds) - 1) / sum(seconds[1:])
    figures = {
        "batch_size": batch_size, "resolution": resolution, "steps": steps, "threads": torch.get_num_threads(),
        "bare_steps_per_s": step_rate, "bare_spread": abs(bare[0][0] - bare[1][0]) / step_rate,
        "forward_over_bare_step": step_rate / forward_rate,
        "floor_bare_plus_two_forwards": 1 + 2 * step_rate / forward_rate,
        "ratio_round_iteration_over_bare": step_rate / round_rate,
    }
    emit(figures, json_out)


if __name__ == "__main__":
    main()
