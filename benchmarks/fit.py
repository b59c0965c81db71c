"""`trainer fit` throughput against the bare student step, interleaved in one run.

bare: the student's forward + loss + backward + the same optimiser step (fused AdamW, gradient buffers freed)
on one batch of tensors already in memory (text embeddings included), the same model, batch size and loss;
nothing else. trainer: a `trainer fit` step inside its loop: shard streaming and decoding, caption encoding
(cached), the same step, the cross-rank agreement on finite losses, progress and logging (checkpoints
excluded). The two alternate step by step (`after_step`), so a machine load that comes and goes hits both;
each ratio is bare seconds / trainer seconds (the trainer's rate over the bare rate) over blocks of turns,
the first turn (it starts the data loader) left out, printed as median [min-max].

Contenders: no EMA, with EMA (decay 0.9999), and with one DataLoader worker (on 2 cores a worker takes CPU
from the step, and it also prefetches while the bare step runs: that ratio flatters the trainer).

    python benchmarks/fit.py [--samples 256] [--batch-size 8] [--resolution 128] [--steps 60] [--blocks 4]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch
from accelerate.state import AcceleratorState

from diffusion.teacher import load_teacher
from diffusion.unet import unet_eps
from evaluation.timing import Turns, ratio
from shards.reader import ShardStream
from trainer.config import FitConfig
from trainer.fit import build_student, make_optimizer, run_fit
from trainer.losses import cfg_distill_loss
from trainer.optim import clear_gradients

from figures import build_shard_world, emit, shard_world_options  # benchmarks/figures.py: the scripts run from benchmarks/

TARGETS = {"fit_over_bare": ">= 0.98", "fit_ema_over_bare": ">= 0.96"}


def bare_step(cfg: FitConfig, shards: Path):
    """One optimiser step on one in-memory batch, as a callable."""
    teacher = load_teacher(cfg.teacher, with_unet_and_vae=False)
    sample = next(iter(ShardStream(shards, shuffle_buffer=1)))
    batch = {k: v.unsqueeze(0).expand(cfg.batch_size, *v.shape).float() for k, v in sample.items()
             if isinstance(v, torch.Tensor) and v.ndim == 3}
    t = sample["t"].repeat(cfg.batch_size)
    text = teacher.encode_text([sample["caption"]] * cfg.batch_size)
    student = build_student(cfg, teacher.root)
    optimizer = make_optimizer(cfg, student)

    def step() -> None:
        eps = unet_eps(student, teacher.schedule, batch["zt"], t, text)
        cfg_distill_loss(eps, batch["eps_cond"], batch["eps_uncond"], cfg.guidance_scale).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        clear_gradients(optimizer, cfg.keep_grad_buffers)

    step()  # warm-up
    return step


def interleaved_ratio(cfg: FitConfig, bare, blocks: int):
    """The trainer's steps alternating with bare steps: bare seconds / trainer seconds."""
    turns = Turns({"bare": bare})
    run_fit(cfg, after_step=turns.between("fit"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return ratio(turns.seconds["bare"], turns.seconds["fit"], blocks)


@click.command()
@shard_world_options(samples=256, steps=60)
def main(samples: int, batch_size: int, resolution: int, steps: int, blocks: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir, _ = build_shard_world(tmp, samples, resolution)
        cfg = dict(method="cfg-distill", teacher=str(teacher_dir), shards=str(tmp / "shards"), batch_size=batch_size,
                   max_steps=steps, lr_warmup_steps=0, ema_decay=0.0, report_to="none", checkpoint_every=steps)
        bare = bare_step(FitConfig(out=str(tmp / "bare"), **cfg), tmp / "shards")
        figures = {"samples": samples, "batch_size": batch_size, "resolution": resolution, "steps": steps,
                   "threads": torch.get_num_threads()}
        contenders = {"fit_over_bare": {"num_workers": 0}, "fit_ema_over_bare": {"num_workers": 0, "ema_decay": 0.9999},
                      "fit_1_worker_over_bare": {"num_workers": 1}}
        for name, options in contenders.items():
            figures[name] = interleaved_ratio(FitConfig(out=str(tmp / name), **{**cfg, **options}), bare, blocks)
    emit(figures, json_out, TARGETS)


if __name__ == "__main__":
    main()
