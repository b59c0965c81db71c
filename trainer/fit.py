"""The distillation loop of `trainer fit`: shards in, a StableDiffusionPipeline student out, under accelerate.

The losses live in `trainer.losses`; this module only feeds them: it streams micro-batches, encodes captions,
runs the student, accumulates gradients, steps the optimiser, keeps the EMA, logs, checkpoints and resumes.
The progressive loop (`trainer.progressive`) runs on the same pieces: `train_step` takes any micro-batch loss,
and `run_steps` drives steps, logs, checkpoints and Ctrl-C for both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import GradScalerKwargs, ProjectConfiguration
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from diffusion.errors import UserError
from diffusion.files import sha256_file
from diffusion.guidance import DEFAULT_COEFFICIENT, guidance_coefficient
from diffusion.launch import check_world_size
from diffusion.resolution import check_resolution, set_trained_resolution
from diffusion.teacher import load_teacher, load_unet, quiet_library_progress
from diffusion.unet import add_guidance_embedding, unet_eps
from shards.format import TENSORS_BY_KIND
from shards.manifest import MANIFEST, read_dataset_info, recorded_coefficient
from shards.reader import ShardStream
from shards.verify import folder_problems
from students.folder import inference_recipe, pipeline_class
from students.lora import EMBEDDING_WEIGHT
from trainer.config import FitConfig
from trainer.data import MicroBatches, position_generator
from trainer.ema import WarmupEMA
from trainer.fsdp import (collective_parts, drop_unreduced_gradients, enable_fsdp, fsdp_plugin, is_fsdp,
                          unsharded)
from trainer.losses import (cfg_distill_loss, classifier_distill_loss, sample_w, w_distill_eps_loss, w_distill_loss,
                            w_distill_target)
from trainer.optim import clear_gradients, make_adam
from trainer.outdir import prepare_out
from trainer.resume import TrainState, resume_checkpoint, save_checkpoint
from trainer.stop import StopRequest
from trainer.student import (averaged_weights, checkpoint_part, make_student, save_trained_student,
                             trainable_parameters)
from trainer.text_cache import TextEmbeddingCache
from trainer.validation import fit_sampler, shard_loop_validation, step_validation

TEACHER_DTYPE = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


class NonFiniteLoss(UserError):
    pass


def make_accelerator(cfg: FitConfig, grad_scaler: bool = True) -> Accelerator:
    """The run's Accelerator; `grad_scaler=False` keeps fp16 autocast but disables accelerate's loss scaler
    (SiD-LSG: see trainer.sid.build_networks). With --fsdp, or under `accelerate launch` with an FSDP config, it
    shards the student with FSDP2 (trainer.fsdp; refused for what that does not support yet)."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu and cfg.mixed_precision == "fp16":
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 (or no) on CPU")
    plugin = fsdp_plugin(cfg)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=str(Path(cfg.out) / "logs")),
        dataloader_config=DataLoaderConfiguration(split_batches=False),  # --batch-size is per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[] if grad_scaler else [GradScalerKwargs(enabled=False)],
        fsdp_plugin=plugin,
    )
    if plugin is not None:
        enable_fsdp(accelerator, plugin)
    check_world_size(accelerator.num_processes)
    return accelerator


def check_shards(cfg: FitConfig) -> dict[str, Any]:
    info = read_dataset_info(cfg.shards)
    kind = info.get("kind")
    if kind != cfg.shard_kind:
        wanted = " + ".join(TENSORS_BY_KIND[cfg.shard_kind])
        raise UserError(
            f"--method {cfg.method} needs {cfg.shard_kind!r} shards ({wanted}) but {cfg.shards} holds {kind!r} shards"
        )
    refuse_damaged_shards(cfg)
    return info


def refuse_damaged_shards(cfg) -> None:
    """Before any training, on every rank: each shard file is there with the manifest's size (with --verify,
    its sha256 and unique record keys too); otherwise one error naming the first damaged shard."""
    if problems := folder_problems(cfg.shards, verify=cfg.verify):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"--shards {cfg.shards} is damaged: {problems[0]}{more}; run `pipeline inspect {cfg.shards}`")


def with_shard_coefficient(cfg: FitConfig, info: dict[str, Any]) -> FitConfig:
    """classifier-distill without --guidance-coefficient takes the one the shards' dataset.json records."""
    if cfg.method != "classifier-distill" or cfg.guidance_coefficient is not None:
        return cfg
    return dataclasses.replace(cfg, guidance_coefficient=recorded_coefficient(info))


def prepare_unet(unet: UNet2DConditionModel, cfg) -> UNet2DConditionModel:
    """A UNet to train: gradient checkpointing and xformers as configured, train mode (what is trainable is
    trainer.student's choice)."""
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.xformers:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise UserError("--xformers: xformers is not installed (pip install 'guided-distill[xformers]')")
        unet.enable_xformers_memory_efficient_attention()
    return unet.train()


def build_student(cfg: FitConfig, teacher_root: Path) -> UNet2DConditionModel:
    """The teacher's UNet (its --variant's files) in float32, all trainable or with a LoRA adapter
    (trainer.student); for w-distill with the zero-initialised w embedding, trained in both cases."""
    unet = load_unet(teacher_root, variant=cfg.variant)
    if cfg.method == "w-distill":
        unet = add_guidance_embedding(unet, cfg.w_embedding_dim)
    return make_student(prepare_unet(unet, cfg), cfg.lora, (EMBEDDING_WEIGHT,) if cfg.method == "w-distill" else ())


def make_optimizer(cfg, student, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over the student, its kernel chosen for `device`, where it will train (trainer.optim)."""
    return make_adam(trainable_parameters(student), decoupled=True, lr=cfg.lr,
                     betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                     eps=cfg.adam_epsilon, device=device)


def make_lr_scheduler(cfg, optimizer, steps: int):
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=steps)


def make_ema(cfg, student, device) -> WarmupEMA | None:
    """An EMA of the student's weights with diffusers' warm-up, or None when --ema-decay is 0."""
    if not cfg.ema_decay:
        return None
    ema = WarmupEMA(trainable_parameters(student), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    ema.to(device)
    return ema


def shard_micro_batches(cfg, accelerator, fingerprint: str, kind: str | None, tensor_names: tuple[str, ...],
                        step: int) -> Iterator:
    """This rank's micro-batches of the shards from optimiser step `step` on (see trainer.data)."""
    stream = ShardStream(cfg.shards, teacher_fingerprint=fingerprint, kind=kind, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                         resampled=cfg.resampled)
    batches = MicroBatches(stream, cfg.batch_size, tensor_names,
                           resampled_pass_length=cfg.checkpoint_every * cfg.gradient_accumulation_steps,
                           num_workers=cfg.loader_workers)
    return batches.from_position(step * cfg.gradient_accumulation_steps)


def init_trackers(cfg, accelerator, name: str) -> None:
    """accelerate's trackers (TensorBoard by default) in OUT/logs, with the config as hyper-parameters."""
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers(name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in cfg.to_dict().items()})


def w_generator(seed: int, rank: int, micro_index: int) -> torch.Generator:
    """The generator for one micro-batch's w draws: a function of position, so resumes redraw the same w."""
    return position_generator("w", seed, rank, micro_index)


def micro_batch_loss(cfg: FitConfig, student, schedule, device, batch, text, generator) -> torch.Tensor:
    """Mean over the micro-batch of the method's per-sample loss."""
    z_t, t = batch["zt"].to(device).float(), batch["t"].to(device)
    tensors = {k: batch[k].to(device) for k in TENSORS_BY_KIND[cfg.shard_kind]}
    if cfg.method == "w-distill":
        w = sample_w(z_t.shape[0], cfg.w_min, cfg.w_max, generator).to(device)
        eps_student = unet_eps(student, schedule, z_t, t, text, guidance_scale=w)
        eps_teacher_w = w_distill_target(tensors["eps_cond"], tensors["eps_uncond"], w)
        if cfg.w_loss == "eps":
            return w_distill_eps_loss(eps_student, eps_teacher_w).mean()
        x0_student, x0_teacher_w = (schedule.eps_to_x0(z_t, eps, t) for eps in (eps_student, eps_teacher_w))
        return w_distill_loss(x0_student, x0_teacher_w, schedule.a(t, z_t), schedule.sigma(t, z_t)).mean()
    eps_student = unet_eps(student, schedule, z_t, t, text)
    if cfg.method == "cfg-distill":
        return cfg_distill_loss(eps_student, tensors["eps_cond"], tensors["eps_uncond"], cfg.guidance_scale).mean()
    c_t = guidance_coefficient(schedule, t, z_t, cfg.guidance_coefficient or DEFAULT_COEFFICIENT)
    return classifier_distill_loss(eps_student, tensors["eps"], tensors["grad"], c_t, cfg.guidance_scale).mean()


def train_step(cfg, accelerator, student, optimizer, lr_scheduler, ema, loss_fn, text_cache, batches: Iterator,
               state: TrainState, stop: StopRequest, key_log=None) -> float | None:
    """One optimiser step over gradient_accumulation_steps micro-batches; None when a non-finite loss skipped it.
    `loss_fn(batch, text, generator)` is the method's mean loss of one micro-batch; `generator` draws its
    randomness (a function of position, so resumes redraw it).

    Every rank agrees on skipping (and on stopping) through one small reduce per micro-batch, which also
    carries the loss, so no rank ever waits at a collective another rank skipped.
    """
    accum, device = cfg.gradient_accumulation_steps, accelerator.device
    total, skip = 0.0, False
    for i in range(accum):
        micro_index = state.step * accum + i
        batch = next(batches)
        if key_log is not None:
            key_log.writelines(f"{state.step + 1}\t{key}\n" for key in batch["key"])
        if skip:
            continue
        generator = w_generator(cfg.seed, accelerator.process_index, micro_index)
        with accelerator.no_sync(student) if i < accum - 1 else nullcontext():
            text = text_cache(batch["caption"]).with_micro(batch["micro"])
            loss = loss_fn(batch, text, generator)
            finite = bool(torch.isfinite(loss))
            flags = torch.tensor([0.0 if finite else 1.0, float(stop.requested), loss.item() if finite else 0.0],
                                 device=device)
            flags = accelerator.reduce(flags, "sum")
            stop.agreed |= bool(flags[1] > 0)
            if flags[0] > 0:
                skip = True
                continue
            accelerator.backward(loss / accum)
            total += float(flags[2]) / accelerator.num_processes / accum
    if skip:
        clear_gradients(optimizer, cfg.keep_grad_buffers)
        if is_fsdp(accelerator):  # and the accumulated micro-batches' gradients FSDP holds back (trainer.fsdp)
            drop_unreduced_gradients(student)
        return None
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    clear_gradients(optimizer, cfg.keep_grad_buffers)
    if ema is not None:
        ema.step(trainable_parameters(accelerator.unwrap_model(student)))
    return total


AfterStep = Callable[[float], None]  # called with a step's seconds after it, outside them (benchmarks interleave)

W_CONVENTION = ("w is diffusers' guidance_scale s in eps_uncond + s (eps_cond - eps_uncond); the UNet's "
                "timestep_cond is the sinusoidal embedding of s - 1 (Meng et al.'s w), as StableDiffusionPipeline "
                "computes it")


def _record(cfg: FitConfig, info: dict, run: dict, teacher, state: TrainState, accelerator) -> dict[str, Any]:
    """distillation.json: what the student is, what it came from, and how to sample it."""
    recent = list(state.recent_losses)
    w_distill = cfg.method == "w-distill"
    return {
        "method": cfg.method,
        "guidance_scale": None if w_distill else cfg.guidance_scale,
        "guidance_coefficient": cfg.guidance_coefficient,  # classifier-distill: c_t in eps + gamma c_t grad
        "w_range": [cfg.w_min, cfg.w_max] if w_distill else None,
        "w_convention": W_CONVENTION if w_distill else None,
        "w_loss": cfg.w_loss,
        "guidance": info.get("guidance"),
        "teacher": {"path": str(Path(teacher.root).resolve()), "fingerprint": teacher.fingerprint,
                    "variants": teacher.variants},
        "shards": {"path": str(Path(cfg.shards).resolve()), "kind": info.get("kind"),
                   "manifest_sha256": run["data_sha256"], "samples": info.get("samples")},
        "steps": state.step,
        "resolution": info.get("resolution"),  # also the UNet's sample_size (in latents): pipelines sample at it
        "global_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
        "ema_decay": cfg.ema_decay,
        "mixed_precision": cfg.mixed_precision,
        "nonfinite_steps_skipped": state.nonfinite_total,
        "final_losses": {
            "last_step": recent[-1] if recent else None,
            f"mean_last_{len(recent)}_steps": sum(recent) / len(recent) if recent else None,
        },
        "inference": inference_recipe(cfg.method, cfg.guidance_scale, (cfg.w_min, cfg.w_max),
                                      pipeline_class(teacher.root)),
    }


def export_student(cfg, accelerator, student, ema, info, run, teacher, state) -> None:
    unet = accelerator.unwrap_model(student)
    with averaged_weights(ema, trainable_parameters(unet)):  # FSDP: on the local shards, then gathered whole
        whole = unsharded(unet)
        if accelerator.is_main_process:
            save_trained_student(whole, cfg.lora, teacher.root, cfg.variant, Path(cfg.out),
                                 _record(cfg, info, run, teacher, state, accelerator), cfg.merge)
    accelerator.wait_for_everyone()


def run_steps(cfg, accelerator, state: TrainState, until: int, step, checkpoint, current_lr, description: str,
              first: int = 0, after_step: AfterStep | None = None,
              validate: Callable[[int], None] | None = None) -> tuple[str, list[float]]:
    """Call `step(stop, key_log)` until state.step reaches `until`, with a progress bar from `first`, tracker
    logs, checkpoints (every --checkpoint-every steps, at `until`, on Ctrl-C/SIGTERM) and the stop after
    --max-nonfinite-steps skipped steps in a row. Returns ("done" or "interrupted", each step's seconds: data
    wait included, checkpoints not). `after_step(seconds)` is called after each step, outside its time;
    `validate(step)` on the main process at step 0 of a fresh run and every --validate-every steps, outside it
    too (trainer.validation), on every rank (a sharded student is gathered for it)."""
    status, seconds = "done", []
    if validate is not None and state.step == 0:
        validate(0)
    progress_bar = tqdm(total=until - first, initial=state.step - first, desc=description, unit="step",
                        disable=not accelerator.is_main_process)
    with _open_key_log(cfg, accelerator) as key_log, StopRequest() as stop, progress_bar as progress:
        while state.step < until:
            started = time.perf_counter()
            loss = step(stop, key_log)
            seconds.append(time.perf_counter() - started)
            if after_step is not None:
                after_step(seconds[-1])
            state.record(loss)
            progress.update(1)
            if loss is not None:
                progress.set_postfix(loss=f"{loss:.4g}", lr=f"{current_lr():.2g}")
                if state.step % cfg.log_every == 0:
                    accelerator.log({"loss": loss, "lr": current_lr()}, step=state.step)
            if validate is not None and state.step % cfg.validate_every == 0:
                validate(state.step)
            if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                checkpoint()
                raise NonFiniteLoss(f"stopped at step {state.step}: {state.nonfinite_in_a_row} non-finite losses in "
                                    f"a row (lower --lr, or try --mixed-precision bf16/no)")
            if state.step % cfg.checkpoint_every == 0 or state.step == until or stop.agreed:
                checkpoint()
            if stop.agreed:
                status = "interrupted"
                break
    return status, seconds


def _open_key_log(cfg: FitConfig, accelerator):
    """--record-keys: OUT/logs/keys-rankR.tsv, one line (step, record key) per sample this rank trained on;
    otherwise a context that yields None."""
    if not cfg.record_keys:
        return nullcontext()
    path = Path(cfg.out) / "logs" / f"keys-rank{accelerator.process_index}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", buffering=1)


def run_fit(cfg: FitConfig, after_step: AfterStep | None = None) -> dict[str, Any]:
    """Train (or resume) and export. Returns status ("done" or "interrupted"), step, loss, and the seconds of
    each step this run took. Benchmarks pass `after_step(seconds)` to time other work between the steps."""
    quiet_library_progress()
    accelerator = make_accelerator(cfg)
    info = check_shards(cfg)
    cfg = with_shard_coefficient(cfg, info)
    prepare_out(cfg, accelerator, (cfg.teacher, cfg.shards))
    teacher = load_teacher(cfg.teacher, TEACHER_DTYPE[cfg.mixed_precision], accelerator.device,
                           with_unet_and_vae=False, variant=cfg.variant)
    check_resolution(info["resolution"], teacher.root, f"--shards {cfg.shards}: built at --resolution")
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, teacher.root)
    set_trained_resolution(student, info["resolution"], teacher.root)
    optimizer = make_optimizer(cfg, student, accelerator.device)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, cfg.max_steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    ema = make_ema(cfg, accelerator.unwrap_model(student), accelerator.device)  # FSDP: of the local shards

    run = {"identity": cfg.identity(), "data_layout": cfg.data_layout(accelerator.num_processes),
           "teacher_fingerprint": teacher.fingerprint, "data_sha256": sha256_file(Path(cfg.shards) / MANIFEST)}
    parts = collective_parts({"unet": checkpoint_part(student, cfg.lora), "optimizer": optimizer,
                              "lr_scheduler": lr_scheduler, "ema": ema})  # FSDP: the same files, gathered
    state = TrainState()
    if (resumed := resume_checkpoint(Path(cfg.out), cfg.resume, run, accelerator, parts)) is not None:
        state = TrainState.from_dict(resumed[1])
        accelerator.print(f"resumed from {resumed[0]} at step {state.step}")
    if state.step >= cfg.max_steps:
        accelerator.print(f"already at step {state.step} >= --max-steps {cfg.max_steps}; exporting")

    text_cache = TextEmbeddingCache(teacher.encode_text, cfg.text_cache_size)
    batches = shard_micro_batches(cfg, accelerator, teacher.fingerprint, cfg.shard_kind,
                                  TENSORS_BY_KIND[cfg.shard_kind] + ("zt",), state.step)
    init_trackers(cfg, accelerator, "fit")
    loss_fn = partial(micro_batch_loss, cfg, student, teacher.schedule, accelerator.device)
    validate = step_validation(cfg, shard_loop_validation(cfg, accelerator, teacher, student), accelerator, student,
                               ema, partial(fit_sampler, cfg, teacher.schedule))

    def step(stop: StopRequest, key_log) -> float | None:
        return train_step(cfg, accelerator, student, optimizer, lr_scheduler, ema, loss_fn, text_cache, batches,
                          state, stop, key_log)

    def checkpoint() -> None:
        save_checkpoint(Path(cfg.out), state.step, run, cfg.to_dict(), accelerator, parts, state.to_dict(),
                        cfg.checkpoints_total_limit)

    status, step_seconds = run_steps(cfg, accelerator, state, cfg.max_steps, step, checkpoint,
                                     lambda: lr_scheduler.get_last_lr()[0], f"fit {cfg.method}", after_step=after_step,
                                     validate=validate)
    if status == "done":
        export_student(cfg, accelerator, student, ema, info, run, teacher, state)
    accelerator.end_training()
    last = state.recent_losses[-1] if state.recent_losses else math.nan
    return {"status": status, "step": state.step, "loss": last, "nonfinite_steps": state.nonfinite_total,
            "step_seconds": step_seconds}
