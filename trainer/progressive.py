"""The loop of `trainer fit --method progressive`: Meng et al.'s stage 2 on a w-conditioned student.

Each round trains a student to do in one DDIM step, on its own N-step grid, what its teacher does in two on the
2N-step grid, at the same w; the round's student is written as OUT/round-NNsteps/ and becomes the next round's
teacher. The loss is `trainer.losses.progressive_loss`, the grids and DDIM steps are `diffusion.samplers`';
the accelerate machinery (micro-batches from shards, accumulation, EMA, checkpoints, exact resume, Ctrl-C) is
trainer.fit's. A resume continues the round it stopped in, with that round's teacher read from the previous
round's folder.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler

from diffusion.errors import UserError
from diffusion.files import sha256_file
from diffusion.resolution import check_resolution, set_trained_resolution, vae_factor
from diffusion.samplers import CLEAN, ddim_step, grid_coefficients, step_grid
from diffusion.teacher import load_teacher, load_unet, quiet_library_progress
from diffusion.unet import is_w_conditioned, unet_eps
from shards.manifest import MANIFEST, read_dataset_info
from trainer.config import ProgressiveConfig
from trainer.export import read_distillation, save_student
from trainer.fit import (
    TEACHER_DTYPE, W_CONVENTION, AfterStep, init_trackers, make_accelerator, make_ema, make_lr_scheduler,
    make_optimizer, prepare_unet, refuse_damaged_shards, run_steps, shard_micro_batches, train_step,
)
from trainer.losses import progressive_loss, progressive_target, sample_w
from trainer.outdir import prepare_out
from trainer.resume import TrainState, resume_checkpoint, save_checkpoint
from trainer.text_cache import TextEmbeddingCache


def round_folder(out: Path, steps: int) -> Path:
    return Path(out) / f"round-{steps:02d}steps"


def check_inputs(cfg: ProgressiveConfig) -> tuple[dict, tuple[float, float], int]:
    """The starting student's record, the w range to train on and the shards' resolution; one clear error for
    each bad input."""
    record = read_distillation(Path(cfg.student))
    if record is None or record["method"] not in ("w-distill", "progressive"):
        method = None if record is None else record["method"]
        raise UserError(f"--student {cfg.student} must be a w-distill student (or a progressive round); its "
                        f"distillation.json says {method!r}")
    if record["method"] == "progressive" and record["steps"] != cfg.start_steps:
        raise UserError(f"--student {cfg.student} samples in {record['steps']} steps: pass --start-steps "
                        f"{record['steps']} to go on from it")
    info = read_dataset_info(cfg.shards)
    if "z0" not in info.get("tensors", []):
        raise UserError(f"--shards {cfg.shards} holds no clean latents z0: build them with "
                        "`pipeline build-shards --store-clean`")
    refuse_damaged_shards(cfg)
    check_resolution(info["resolution"], cfg.student, f"--shards {cfg.shards}: built at --resolution")
    low, high = record["w_range"]
    w_range = (low if cfg.w_min is None else cfg.w_min, high if cfg.w_max is None else cfg.w_max)
    if not low <= w_range[0] <= w_range[1] <= high:
        raise UserError(f"--w-min/--w-max {w_range} must lie inside the student's w range [{low}, {high}]")
    return record, w_range, info["resolution"]


def round_loss(student, teacher_unet, schedule, steps: int, w_range, device, batch, text, generator) -> torch.Tensor:
    """Mean over one micro-batch of the round's loss: z_t = a_t z0 + sigma_t eps at a point of the student's
    N-step grid, the teacher's two DDIM steps t -> t' -> t'' on the 2N grid at the same w (one pass each), the
    target x~ that one step from t must predict, and the student's x0 against it."""
    z0 = batch["z0"].to(device).float()
    n = z0.shape[0]
    index = torch.randint(0, steps, (n,), generator=generator)
    eps = torch.randn(z0.shape, generator=generator).to(device)
    w = sample_w(n, *w_range, generator).to(device)
    grid = torch.tensor(step_grid(steps, schedule.num_timesteps) + [CLEAN])
    fine = torch.tensor(step_grid(2 * steps, schedule.num_timesteps))
    t, t_mid, t_end = grid[index].to(device), fine[2 * index + 1].to(device), grid[index + 1].to(device)
    a_t, sigma_t = grid_coefficients(schedule, t, z0)
    z_t = a_t * z0 + sigma_t * eps
    with torch.no_grad():
        a_mid, sigma_mid = grid_coefficients(schedule, t_mid, z0)
        a_end, sigma_end = grid_coefficients(schedule, t_end, z0)
        eps_1 = unet_eps(teacher_unet, schedule, z_t, t, text, guidance_scale=w)
        z_mid = ddim_step(z_t, eps_1, a_t, sigma_t, a_mid, sigma_mid)
        eps_2 = unet_eps(teacher_unet, schedule, z_mid, t_mid, text, guidance_scale=w)
        z_end = ddim_step(z_mid, eps_2, a_mid, sigma_mid, a_end, sigma_end)
        target = progressive_target(z_t, z_end, a_t, sigma_t, a_end, sigma_end)
    eps_student = unet_eps(student, schedule, z_t, t, text, guidance_scale=w)
    x0_student = (z_t - sigma_t * eps_student) / a_t
    return progressive_loss(x0_student, target, a_t, sigma_t).mean()


def grid_scheduler_config(scheduler_config: dict) -> dict:
    """DDIM on the trailing grid ending at the clean sample: StableDiffusionPipeline then samples a round's
    student on exactly its training grid whenever its step count divides the train timesteps (8, 4, 2, 1)."""
    config = DDIMScheduler.from_config({**scheduler_config, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                        "prediction_type": scheduler_config.get("prediction_type", "epsilon")})
    return dict(config.config)


def export_round(cfg, unet, start_record: dict, source: Path, steps: int, w_range, state, global_batch: int,
                 run: dict, schedule) -> Path:
    """OUT/round-NNsteps/: a StableDiffusionPipeline folder (DDIM on the trailing grid) + distillation.json."""
    folder = round_folder(Path(cfg.out), steps)
    grid = step_grid(steps, schedule.num_timesteps)
    recent = list(state.recent_losses)
    record = {
        "method": "progressive", "steps": steps, "timesteps": grid, "teacher_steps": 2 * steps,
        "w_range": list(w_range), "w_convention": W_CONVENTION, "guidance_scale": None,
        "teacher": start_record["teacher"], "start_student": str(Path(cfg.student).resolve()),
        "shards": {"path": str(Path(cfg.shards).resolve()), "manifest_sha256": run["data_sha256"]},
        "resolution": unet.config.sample_size * vae_factor(source),
        "round": cfg.round_steps.index(steps) + 1, "rounds": len(cfg.round_steps),
        "iters_per_round": cfg.iters_per_round, "global_batch_size": global_batch, "ema_decay": cfg.ema_decay,
        "mixed_precision": cfg.mixed_precision, "nonfinite_steps_skipped": state.nonfinite_total,
        "final_losses": {f"mean_last_{len(recent)}_steps": sum(recent) / len(recent) if recent else None},
        "inference": {"sampler": "grid-ddim (deterministic) or grid-stochastic (Meng et al.)", "steps": steps,
                      "timesteps": grid, "unet_passes_per_step": 1, "w_range": list(w_range),
                      "pipeline": f"StableDiffusionPipeline(num_inference_steps={steps}, guidance_scale=w) with its "
                                  "DDIMScheduler (trailing, set_alpha_to_one): the same grid when the step count "
                                  "divides the train timesteps"},
    }
    save_student(unet, source, folder, record)
    use_grid_scheduler(folder)
    return folder


def use_grid_scheduler(folder: Path) -> None:
    """Make a pipeline folder's scheduler DDIM on the trailing grid (see grid_scheduler_config)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(grid_scheduler_config(json.loads(path.read_text())), indent=2))
    index = json.loads((Path(folder) / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2))


def run_progressive(cfg: ProgressiveConfig, after_step: AfterStep | None = None) -> dict[str, Any]:
    """Every round not yet written, resuming the one a checkpoint stopped in. Returns status, step, the round
    folders and each step's seconds; `after_step` as in run_fit."""
    quiet_library_progress()
    accelerator = make_accelerator(cfg)
    start_record, w_range, resolution = check_inputs(cfg)
    prepare_out(cfg, accelerator, (cfg.student, cfg.shards))
    base = load_teacher(cfg.student, TEACHER_DTYPE[cfg.mixed_precision], accelerator.device, with_unet_and_vae=False)
    fingerprint = start_record["teacher"]["fingerprint"]  # the shards were built by the original teacher
    torch.manual_seed(cfg.seed)
    student = load_unet(base.root)
    if not is_w_conditioned(student):
        raise UserError(f"--student {cfg.student}: its UNet has no w embedding (time_cond_proj_dim)")
    student = prepare_unet(student, cfg)
    set_trained_resolution(student, resolution, base.root)
    teacher_unet = load_unet(base.root, base.dtype).to(accelerator.device).eval().requires_grad_(False)
    optimizer = make_optimizer(cfg, student, accelerator.device)
    student, optimizer = accelerator.prepare(student, optimizer)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, cfg.iters_per_round)
    ema = make_ema(cfg, student, accelerator.device)
    parts = {"unet": student, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "ema": ema}
    run = {"identity": cfg.identity(), "data_layout": cfg.data_layout(accelerator.num_processes),
           "teacher_fingerprint": fingerprint, "data_sha256": sha256_file(Path(cfg.shards) / MANIFEST)}
    state = TrainState()
    if (resumed := resume_checkpoint(Path(cfg.out), cfg.resume, run, accelerator, parts)) is not None:
        state = TrainState.from_dict(resumed[1])
        accelerator.print(f"resumed from {resumed[0]} at step {state.step}")
    text_cache = TextEmbeddingCache(base.encode_text, cfg.text_cache_size)
    batches = shard_micro_batches(cfg, accelerator, fingerprint, None, ("z0",), state.step)
    init_trackers(cfg, accelerator, "fit-progressive")
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    unwrapped = accelerator.unwrap_model(student)
    folders, seconds, k = [], [], cfg.iters_per_round
    previous = Path(cfg.student)
    for number, steps in enumerate(cfg.round_steps):
        end = (number + 1) * k
        done = (round_folder(Path(cfg.out), steps) / "distillation.json").is_file()
        if done and state.step >= end:
            previous = round_folder(Path(cfg.out), steps)
            folders.append(previous)
            continue
        weights = load_unet(previous).state_dict()  # float32, whatever dtype the frozen teacher runs in
        teacher_unet.load_state_dict(weights)
        if state.step <= number * k:  # a fresh round: the student starts as its teacher, with fresh optimiser state
            state.step = number * k
            state.recent_losses.clear()
            unwrapped.load_state_dict(weights)
            getattr(optimizer, "optimizer", optimizer).state.clear()
            lr_scheduler.load_state_dict(make_lr_scheduler(cfg, optimizer, k).state_dict())
            if ema is not None:
                ema.load_state_dict(make_ema(cfg, unwrapped, accelerator.device).state_dict())
        loss_fn = partial(round_loss, student, teacher_unet, base.schedule, steps, w_range, accelerator.device)

        def step(stop, key_log, loss_fn=loss_fn):
            return train_step(cfg, accelerator, student, optimizer, lr_scheduler, ema, loss_fn, text_cache,
                              batches, state, stop, key_log)

        def checkpoint():
            save_checkpoint(Path(cfg.out), state.step, run, cfg.to_dict(), accelerator, parts, state.to_dict(),
                            cfg.checkpoints_total_limit)

        status, round_seconds = run_steps(cfg, accelerator, state, end, step, checkpoint,
                                          lambda: lr_scheduler.get_last_lr()[0],
                                          f"round {number + 1}/{len(cfg.round_steps)}: {2 * steps} -> {steps} steps",
                                          first=number * k, after_step=after_step)
        seconds += round_seconds
        if status == "interrupted":
            accelerator.end_training()
            return {"status": status, "step": state.step, "rounds": folders, "step_seconds": seconds}
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        if accelerator.is_main_process:
            export_round(cfg, unwrapped, start_record, base.root, steps, w_range, state, global_batch, run,
                         base.schedule)
        accelerator.wait_for_everyone()
        previous = round_folder(Path(cfg.out), steps)
        folders.append(previous)
    accelerator.end_training()
    last = state.recent_losses[-1] if state.recent_losses else math.nan
    return {"status": "done", "step": state.step, "loss": last, "rounds": folders, "step_seconds": seconds}
