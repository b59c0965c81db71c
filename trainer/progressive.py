"""The loop of `trainer fit --method progressive`: Meng et al.'s stage 2 on a w-conditioned student.

Each round trains a student to do in one DDIM step, on its own N-step grid, what its teacher does in two on the
2N-step grid, at the same w; the round's student is written as OUT/round-NNsteps/ and becomes the next round's
teacher. The loss is `trainer.losses.progressive_loss`, the grids and DDIM steps are `diffusion.samplers`';
the accelerate machinery (micro-batches from shards, accumulation, EMA, checkpoints, exact resume, Ctrl-C) is
trainer.fit's. A resume continues the round it stopped in, with that round's teacher read from the previous
round's folder.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import UserError
from diffusion.files import sha256_file
from diffusion.resolution import check_resolution, set_trained_resolution, vae_factor
from diffusion.samplers import CLEAN, ddim_step, grid_coefficients, step_grid
from diffusion.teacher import load_teacher, load_unet, quiet_library_progress
from diffusion.unet import is_w_conditioned, unet_eps
from shards.manifest import MANIFEST, read_dataset_info
from students.folder import pipeline_class, read_distillation
from students.lora import load_adapter_weights, refuse_unmerged
from students.recipes import (SEEDED, TRAILING_DDIM, TRAILING_DPM_SOLVER_1, scheduler_code, scheduler_entry,
                              use_scheduler)
from trainer.config import ProgressiveConfig
from trainer.fit import (
    TEACHER_DTYPE, W_CONVENTION, AfterStep, init_trackers, make_accelerator, make_ema, make_lr_scheduler,
    make_optimizer, prepare_unet, refuse_damaged_shards, run_steps, shard_micro_batches, train_step,
)
from trainer.fsdp import collective_parts, load_whole, shard_frozen, unsharded
from trainer.losses import progressive_loss, progressive_target, sample_w
from trainer.outdir import prepare_out
from trainer.resume import TrainState, resume_checkpoint, save_checkpoint
from trainer.student import (DEFAULT_ADAPTER, AdapterView, adapter_parameters, add_adapters, checkpoint_part,
                             make_student, save_trained_student, trainable_parameters)
from trainer.text_cache import TextEmbeddingCache
from trainer.validation import grid_sampler, shard_loop_validation, step_validation

TEACHER_ADAPTER = "teacher"  # a LoRA run's round teacher: the previous round's adapter on the same UNet


def round_folder(out: Path, steps: int) -> Path:
    return Path(out) / f"round-{steps:02d}steps"


def check_inputs(cfg: ProgressiveConfig) -> tuple[dict, tuple[float, float], int]:
    """The starting student's record, the w range to train on and the shards' resolution; one clear error for
    each bad input."""
    record = read_distillation(Path(cfg.student))
    refuse_unmerged(Path(cfg.student), record, "--student")
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


def grid_scheduler(steps: int, num_train_timesteps: int) -> tuple[type, dict]:
    """The stock scheduler (students.recipes) with which `pipe(prompt, num_inference_steps=N)` samples an N-step
    student as grid_ddim does, on exactly its training grid: DDIM on the trailing grid, as before, when N divides
    the train timesteps (8, 4, 2, 1); otherwise (64, 32, 16, 3) DDIM's step t -> t - T // N leaves the grid, and
    first-order DPM-Solver++ takes DDIM's steps between the grid's own points. Euler would not do: its trailing
    init_noise_sigma starts the UNet from sqrt(1 - alphabar_999) z, not z (0.23 % smaller for SD's schedule)."""
    return TRAILING_DDIM if num_train_timesteps % steps == 0 else TRAILING_DPM_SOLVER_1


def export_round(cfg, unet, start_record: dict, source: Path, steps: int, w_range, state, global_batch: int,
                 run: dict, schedule) -> Path:
    """OUT/round-NNsteps/: a pipeline folder in the starting student's layout (its scheduler on the round's grid:
    grid_scheduler) + distillation.json, whose inference recipe holds the stock calls for text, image and
    inpainting, in that pipeline class's family (StableDiffusionXLPipeline: StableDiffusionXLImg2ImgPipeline)."""
    folder = round_folder(Path(cfg.out), steps)
    grid = step_grid(steps, schedule.num_timesteps)
    scheduler = grid_scheduler(steps, schedule.num_timesteps)
    on_grid = f"num_inference_steps={steps}, guidance_scale=w"
    strength = f"strength=k / {steps}, {on_grid}"  # the pipelines run the grid's last int(strength * N) = k steps
    recent = list(state.recent_losses)
    pipeline = pipeline_class(source)
    family = pipeline.removesuffix("Pipeline")
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
                      "pipeline": f"{pipeline} with {scheduler[0].__name__} (trailing; the folder's own),"
                                  f" num_inference_steps={steps}: the same grid and latents as grid-ddim",
                      "scheduler": scheduler_entry(scheduler),
                      "call": f"{scheduler_code(*scheduler)}\nimage = pipe(prompt, {on_grid}, {SEEDED}).images[0]"
                              f"  # any w in {list(w_range)}",
                      "img2img": f"img2img = {family}Img2ImgPipeline.from_pipe(pipe)\n"
                                 f"image = img2img(prompt, image=init_image, {strength}).images[0]  # k of the "
                                 f"{steps} steps, from t = timesteps[{steps} - k]\n"
                                 f"inpaint = {family}InpaintPipeline.from_pipe(pipe)\n"
                                 f"image = inpaint(prompt, image=init_image, mask_image=mask, {strength}).images[0]"},
    }
    save_trained_student(unet, cfg.lora, source, None, folder, record, cfg.merge)
    return folder


def use_grid_scheduler(folder: Path) -> None:
    """Make a pipeline folder's scheduler DDIM on the trailing grid: the grid of every step count that divides
    the train timesteps (see grid_scheduler)."""
    use_scheduler(folder, *TRAILING_DDIM)


def round_networks(cfg: ProgressiveConfig, root: Path, dtype: torch.dtype, resolution: int, device):
    """The student to train and the rounds' frozen teacher. Full: the starting student's UNet twice. LoRA: once,
    frozen, with two adapters: the student's and the teacher's (the previous round's adapter; in round 1 none,
    B = 0: the starting student itself). Every round's adapter sits on the starting student's UNet."""
    unet = load_unet(root)
    if not is_w_conditioned(unet):
        raise UserError(f"--student {cfg.student}: its UNet has no w embedding (time_cond_proj_dim)")
    unet = prepare_unet(unet, cfg)
    set_trained_resolution(unet, resolution, root)
    if cfg.lora is None:
        return make_student(unet, None), load_unet(root, dtype).to(device).eval().requires_grad_(False)
    add_adapters(unet.to(device), cfg.lora, (DEFAULT_ADAPTER, TEACHER_ADAPTER))
    for parameter in adapter_parameters(unet, (TEACHER_ADAPTER,)):
        parameter.requires_grad_(False)
    return AdapterView(unet, DEFAULT_ADAPTER), AdapterView(unet, TEACHER_ADAPTER)


def start_round(previous: Path, of_this_run: bool, teacher_unet, student, fresh: bool, lora) -> None:
    """The round's teacher becomes the previous round's student (`previous`: a round folder of this run, or the
    starting student); on a fresh round the student starts as that teacher."""
    if lora is None:
        weights = load_unet(previous).state_dict()  # float32, whatever dtype the frozen teacher runs in
        load_whole(teacher_unet, weights)
        if fresh:
            load_whole(student, weights)
    elif of_this_run:  # round 1's adapters start as created (B = 0): the starting student
        for view in (teacher_unet, student) if fresh else (teacher_unet,):
            load_adapter_weights(view.base, previous, view.name)


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
    student, teacher_unet = round_networks(cfg, base.root, base.dtype, resolution, accelerator.device)
    optimizer = make_optimizer(cfg, student, accelerator.device)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher_unet = shard_frozen(accelerator, teacher_unet, cfg.fsdp_teacher == "shard")  # as is without FSDP
    lr_scheduler = make_lr_scheduler(cfg, optimizer, cfg.iters_per_round)
    ema = make_ema(cfg, student, accelerator.device)
    parts = collective_parts({"unet": checkpoint_part(student, cfg.lora), "optimizer": optimizer,
                              "lr_scheduler": lr_scheduler, "ema": ema})
    run = {"identity": cfg.identity(), "data_layout": cfg.data_layout(accelerator.num_processes),
           "teacher_fingerprint": fingerprint, "data_sha256": sha256_file(Path(cfg.shards) / MANIFEST)}
    state = TrainState()
    if (resumed := resume_checkpoint(Path(cfg.out), cfg.resume, run, accelerator, parts)) is not None:
        state = TrainState.from_dict(resumed[1])
        accelerator.print(f"resumed from {resumed[0]} at step {state.step}")
    text_cache = TextEmbeddingCache(base.encode_text, cfg.text_cache_size)
    batches = shard_micro_batches(cfg, accelerator, fingerprint, None, ("z0",), state.step)
    init_trackers(cfg, accelerator, "fit-progressive")
    validation = shard_loop_validation(cfg, accelerator, base, student)
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
        fresh = state.step <= number * k  # a fresh round: the student starts as its teacher, fresh optimiser state
        start_round(previous, previous != Path(cfg.student), teacher_unet, unwrapped, fresh, cfg.lora)
        if fresh:
            state.step = number * k
            state.recent_losses.clear()
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
                                          first=number * k, after_step=after_step,
                                          validate=step_validation(cfg, validation, accelerator, student, ema,
                                                                   partial(grid_sampler, base.schedule, steps,
                                                                           sum(w_range) / 2)))
        seconds += round_seconds
        if status == "interrupted":
            accelerator.end_training()
            return {"status": status, "step": state.step, "rounds": folders, "step_seconds": seconds}
        if ema is not None:
            ema.copy_to(trainable_parameters(unwrapped))
        whole = unsharded(unwrapped)  # FSDP: gathered onto the main process's CPU (every rank takes part)
        if accelerator.is_main_process:
            export_round(cfg, whole, start_record, base.root, steps, w_range, state, global_batch, run,
                         base.schedule)
        accelerator.wait_for_everyone()
        previous = round_folder(Path(cfg.out), steps)
        folders.append(previous)
    accelerator.end_training()
    last = state.recent_losses[-1] if state.recent_losses else math.nan
    return {"status": "done", "step": state.step, "loss": last, "rounds": folders, "step_seconds": seconds}
