"""The SiD-LSG loop of `trainer fit --method sid-lsg`: a prompt list in, a one-step generator out, under accelerate.

Score identity Distillation with Long-Short Guidance (Zhou et al. 2024/2025), data-free: the teacher is frozen;
a fake score network and the generator both start as the teacher's UNet. Each iteration updates the fake network
on the generator's current images, then the generator (1:1), each over gradient_accumulation_steps micro-batches
(only the last one syncs under DDP). The losses live in `trainer.losses`, the one-step generator in
`diffusion.samplers.sid_one_step`; this module feeds them. Every random draw (prompts, z, eps, t, prompt dropout)
is a function of (seed, iteration, phase, round, rank), so a resume continues exactly.

Non-finite values, as the official loop means them (`training/sid_training_loop.py`): a sample with a
non-finite value is dropped from its loss, the gradients are cleaned with nan_to_num, and the step goes ahead.
Here a dropped sample's NaN cannot reach the weights through 0 x NaN in the backward (`fake_score_loss`,
`zero_gradient_of_dropped`), fp16 runs without a loss scaler (`run_sid`), a step is skipped only when
no rank kept a sample, and dropped samples, skipped and cleaned steps are counted (logs, checkpoints,
distillation.json); `--max-nonfinite-steps` skipped steps in a row of one network stop the run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion.conditioning import Conditioning
from diffusion.errors import UserError
from diffusion.samplers import sid_one_step
from diffusion.teacher import load_teacher, load_unet, quiet_library_progress
from diffusion.unet import guided_eps, guided_x0
from students.folder import pipeline_class
from students.recipes import SEEDED, TRAILING_EULER, scheduler_code, scheduler_entry
from trainer.data import position_generator
from trainer.ema import HalfLifeEMA
from trainer.fit import AfterStep, init_trackers, make_accelerator, prepare_unet
from trainer.fsdp import collective_parts, local_tensor, shard_frozen, unsharded
from trainer.losses import finite_samples, sid_fake_score_loss, sid_generator_loss
from trainer.optim import clear_gradients, make_adam
from trainer.prompts import PromptSampler, read_prompts
from trainer.outdir import prepare_out
from trainer.resume import resume_checkpoint, save_checkpoint
from trainer.sid_config import SidConfig
from trainer.stop import StopRequest
from trainer.student import AdapterView, add_adapters, make_student, save_trained_student
from trainer.text_cache import TextEmbeddingCache
from trainer.validation import Validation, kimg_label, latent_shape, sid_sampler

FAKE, GENERATOR = 0, 1
ADAPTERS = ("generator", "fake", "generator_ema")  # a LoRA run's adapters on the teacher's UNet
RECENT = 100
NETWORK_NAMES = ("fake score network", "generator")


class NonFiniteSteps(UserError):
    pass


@dataclass(frozen=True)
class StepResult:
    """One network's optimiser step, summed over ranks."""

    loss_sum: float  # over the kept samples
    kept: int  # samples with finite values, the only ones in the loss
    skipped: bool  # no finite sample in the global batch: the optimiser did not step
    cleaned: bool  # the step was taken after non-finite gradient values were replaced

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.kept if self.kept else math.nan


@dataclass
class SidState:
    iteration: int = 0
    images: int = 0  # generated images the generator has trained on (all ranks)
    dropped_samples: int = 0  # samples dropped from a loss for non-finite values (both networks, all ranks)
    skipped_steps: int = 0  # optimiser steps not taken: no finite sample in the global batch (both networks)
    cleaned_steps: int = 0  # optimiser steps taken after non-finite gradient values were replaced (both networks)
    # per network (FAKE, GENERATOR): how many of its latest optimiser steps were skipped, in a row
    skipped_in_a_row: list = field(default_factory=lambda: [0, 0])
    recent_generator: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_fake: deque = field(default_factory=lambda: deque(maxlen=RECENT))

    def count(self, phase: int, step: StepResult, global_batch: int) -> None:
        """Add one optimiser step of network `phase` to the counters."""
        self.dropped_samples += global_batch - step.kept
        self.skipped_steps += step.skipped
        self.cleaned_steps += step.cleaned
        self.skipped_in_a_row[phase] = self.skipped_in_a_row[phase] + 1 if step.skipped else 0
        if not step.skipped:
            (self.recent_fake if phase == FAKE else self.recent_generator).append(step.mean_loss)

    def nonfinite_counts(self) -> dict[str, int]:
        return {"dropped_samples": self.dropped_samples, "skipped_steps": self.skipped_steps,
                "cleaned_steps": self.cleaned_steps}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recent_generator": list(self.recent_generator), "recent_fake": list(self.recent_fake)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SidState":
        """The saved counters; a checkpoint written before skipped steps were counted has none of them (they
        start at 0) and kept `nonfinite_in_a_row`, the iterations in a row without a finite generator sample:
        exactly the generator's skipped steps in a row."""
        values = dict(values)
        if "nonfinite_in_a_row" in values:
            values["skipped_in_a_row"] = [0, values.pop("nonfinite_in_a_row")]
        state = cls(**{k: v for k, v in values.items() if not k.startswith("recent_")})
        state.recent_generator.extend(values["recent_generator"])
        state.recent_fake.extend(values["recent_fake"])
        return state


@dataclass
class SidNetworks:
    """The three UNets and what trains them. `generator` and `fake` are accelerate-prepared modules (DDP, or FSDP
    with the EMA's and the teacher's UNets sharded alike: trainer.fsdp)."""

    teacher: Any  # diffusion.teacher.Teacher, frozen
    generator: torch.nn.Module
    fake: torch.nn.Module
    generator_optimizer: torch.optim.Optimizer
    fake_optimizer: torch.optim.Optimizer
    ema: HalfLifeEMA | None

    def parts(self) -> dict[str, Any]:
        """What a checkpoint holds (FSDP: the same files, gathered from the shards)."""
        return collective_parts({"generator": self.generator, "fake_score": self.fake,
                                 "generator_optimizer": self.generator_optimizer, "fake_optimizer": self.fake_optimizer,
                                 "generator_ema": self.ema.model if self.ema else None})

    def sampling_generator(self) -> torch.nn.Module:
        """The generator to sample and export: its EMA when there is one."""
        return self.ema.model if self.ema is not None else _unwrap(self.generator)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


class CountingEncoder:
    """The teacher's text encoder for images of `size` pixels, counting the distinct prompts the tokenizer
    truncates."""

    def __init__(self, teacher, size: int):
        self.teacher, self.size, self.truncated = teacher, size, 0

    def __call__(self, prompts: list[str]) -> Conditioning:
        lengths = [len(ids) for ids in self.teacher.tokenizer(prompts, verbose=False).input_ids]
        self.truncated += sum(n > self.teacher.tokenizer.model_max_length for n in lengths)
        return self.teacher.encode_text(prompts, size=self.size)


def draw_micro_batch(cfg: SidConfig, sampler: PromptSampler, phase: int, iteration: int, round_index: int,
                     rank: int, world: int, latent_shape: tuple[int, ...]):
    """Prompts, z, eps and t of one micro-batch, from its position alone; "" replaces each of the fake network's
    prompts with probability `prompt_dropout` when its guidance is on."""
    micro = (iteration * 2 + phase) * cfg.gradient_accumulation_steps + round_index
    prompts = sampler.batch((micro * world + rank) * cfg.batch_size, cfg.batch_size)
    generator = position_generator("sid", cfg.seed, micro, rank)
    z = torch.randn((cfg.batch_size, *latent_shape), generator=generator)
    noise = torch.randn((cfg.batch_size, *latent_shape), generator=generator)
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (cfg.batch_size,), generator=generator)
    if phase == FAKE and cfg.uses_dropout:
        dropped = (torch.rand(cfg.batch_size, generator=generator) < cfg.prompt_dropout).tolist()
        prompts = ["" if drop else p for drop, p in zip(dropped, prompts)]
    return prompts, z, noise, t


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) mask shaped to broadcast against `like` (B, ...)."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def zero_gradient_of_dropped(x: torch.Tensor, keep: torch.Tensor) -> None:
    """Make the gradient that reaches `x` exactly 0 on the dropped samples, by torch.where: the loss already
    leaves them out, but a NaN the teacher or the fake network made for one of them comes back through their
    backward as 0 x NaN = NaN and would reach every generator weight through the batch sums of its backward
    (the official loop indexes the samples out after the forward, so it has this leak and zeroes those weight
    gradients whole with nan_to_num, losing the step)."""
    if x.requires_grad and not bool(keep.all()):
        mask = _per_sample(keep, x)
        x.register_hook(lambda grad: torch.where(mask, grad, torch.zeros_like(grad)))


def fake_score_loss(cfg, nets: SidNetworks, text, uncond, z, noise, t) -> tuple[torch.Tensor, int]:
    """Sum over the finite samples of the fake network's per-sample loss, and how many were kept. A non-finite
    x_g is replaced by 0 before the fake network sees it (and dropped): its NaN would otherwise sit in the fake
    network's activations, and 0 x NaN in the backward would spoil every weight gradient."""
    schedule = nets.teacher.schedule
    with torch.no_grad():
        x_g = sid_one_step(_unwrap(nets.generator), schedule, z, cfg.t_init, text)
    finite_x_g = finite_samples(x_g)
    x_g = torch.where(_per_sample(finite_x_g, x_g), x_g, torch.zeros_like(x_g))
    x_t = schedule.add_noise(x_g, noise, t)
    (eps_fake,) = guided_eps(nets.fake, schedule, x_t, t, text, uncond, (cfg.kappa1,))
    per_sample = sid_fake_score_loss(eps_fake, noise)
    keep = finite_x_g & finite_samples(per_sample[:, None])
    return per_sample[keep].sum(), int(keep.sum())


def generator_loss(cfg, nets: SidNetworks, text, uncond, z, noise, t) -> tuple[torch.Tensor, int]:
    """Sum over the finite samples of the generator's per-sample loss: the same x_t for the teacher (kappa4)
    and the fake network (kappa2, kappa3); gradients reach x_g through both, never their weights, and never
    from a dropped sample (`zero_gradient_of_dropped`)."""
    schedule, teacher = nets.teacher.schedule, nets.teacher
    x_g = sid_one_step(nets.generator, schedule, z, cfg.t_init, text)
    x_t = schedule.add_noise(x_g, noise, t)
    kappa2_3 = (cfg.kappa2,) if cfg.kappa2 == cfg.kappa3 else (cfg.kappa2, cfg.kappa3)
    y_fakes = guided_x0(_unwrap(nets.fake), schedule, x_t, t, text, uncond, kappa2_3)
    (y_real,) = guided_x0(teacher.unet, schedule, x_t, t, text, uncond, (cfg.kappa4,))
    keep = finite_samples(x_g, y_real, *y_fakes)
    zero_gradient_of_dropped(x_g, keep)
    y_fake3 = y_fakes[-1][keep] if len(y_fakes) == 2 else None
    per_sample = sid_generator_loss(x_g[keep], y_real[keep], y_fakes[0][keep], cfg.alpha, y_fake3)
    return per_sample.sum(), int(keep.sum())


def clean_gradients(module: torch.nn.Module, clip_value: float | None) -> bool:
    """The official loop's guard before each optimiser step: non-finite gradient values replaced (nan -> 0,
    +-inf -> +-1e5), then clipped by value if asked. Returns whether any value was replaced: a NaN born inside
    the network being trained still reaches its weight gradients, and that step goes ahead cleaned.

    One multi-tensor norm finds the usual case, every value finite, without a pass per tensor (those passes
    cost 9 % of a CPU iteration); only then, or when a norm overflowed, is each tensor checked and cleaned.
    Every operation is elementwise, so under FSDP each process cleans its own shard of the gradients (and says
    whether it replaced anything in it: network_step agrees over the processes)."""
    grads = [local_tensor(p.grad) for p in module.parameters() if p.grad is not None]
    if not grads:
        return False
    replaced = False
    if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        replaced = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip_value is not None:  # torch.nn.utils.clip_grad_value_'s clamp, on the local tensors
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
    return replaced


def network_step(cfg, accelerator, nets: SidNetworks, phase: int, sampler, text_cache, uncond, iteration: int,
                 latent_shape) -> StepResult:
    """One optimiser step of the fake network (phase FAKE) or the generator, over all ranks. Only the last
    micro-batch syncs gradients under DDP. The step is skipped, on every rank alike, only when no rank kept a
    finite sample (the official loop then has no gradient either); otherwise it goes ahead, cleaned."""
    module, optimizer = (nets.fake, nets.fake_optimizer) if phase == FAKE else (nets.generator,
                                                                                 nets.generator_optimizer)
    loss_fn = fake_score_loss if phase == FAKE else generator_loss
    nets.fake.requires_grad_(phase == FAKE)  # the generator step differentiates through the fake net's activations
    accum, device = cfg.gradient_accumulation_steps, accelerator.device
    total, kept = 0.0, 0
    for round_index in range(accum):
        prompts, z, noise, t = draw_micro_batch(cfg, sampler, phase, iteration, round_index,
                                                accelerator.process_index, accelerator.num_processes, latent_shape)
        with accelerator.no_sync(module) if round_index < accum - 1 else nullcontext(), accelerator.autocast():
            text = text_cache(prompts)
            loss, n = loss_fn(cfg, nets, text, uncond, z.to(device), noise.to(device), t.to(device))
            accelerator.backward(loss / (cfg.batch_size * accum))  # sum over elements / batch, as the seed
        total, kept = total + float(loss.detach()), kept + n
    totals = accelerator.reduce(torch.tensor([total, kept], dtype=torch.float64, device=device), "sum")
    total, kept = float(totals[0]), int(totals[1])
    cleaned = False
    if kept > 0:
        clip = 1.0 if phase == GENERATOR and cfg.mixed_precision == "fp16" else None
        replaced = torch.tensor([float(clean_gradients(module, clip))], device=device)
        cleaned = bool(accelerator.reduce(replaced, "sum") > 0)  # FSDP: any process's shard
        optimizer.step()
    clear_gradients(optimizer, cfg.keep_grad_buffers)
    nets.fake.requires_grad_(True)
    return StepResult(total, kept, kept == 0, cleaned)


def build_networks(cfg: SidConfig, accelerator) -> SidNetworks:
    teacher = load_teacher(cfg.teacher, cfg.teacher_precision, accelerator.device, variant=cfg.variant)
    if teacher.vae.dtype != torch.float32:
        teacher.vae.to(torch.float32)  # it only decodes sample grids
    if cfg.gradient_checkpointing:
        teacher.unet.enable_gradient_checkpointing()
    torch.manual_seed(cfg.seed)
    if cfg.lora is None:
        generator = make_student(prepare_unet(load_unet(teacher.root, variant=cfg.variant), cfg), None)
        fake = copy.deepcopy(generator)  # both start as the teacher's UNet in float32: one read from disk
        average = None
    else:  # one UNet in memory: the teacher's, with the generator's, the fake network's and the EMA's adapters
        base = prepare_unet(teacher.unet, cfg)
        add_adapters(base, cfg.lora, ADAPTERS)
        generator, fake, average = (AdapterView(base, name) for name in ADAPTERS)
        teacher = dataclasses.replace(teacher, unet=AdapterView(base, None))
    ema = (HalfLifeEMA(generator, cfg.ema_halflife_kimg, cfg.ema_rampup, average)
           if cfg.ema_halflife_kimg > 0 else None)
    adam = {"decoupled": False, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon,
            "device": accelerator.device}
    generator_optimizer = make_adam(generator.parameters(), lr=cfg.lr, **adam)
    fake_optimizer = make_adam(fake.parameters(), lr=cfg.lr_fake, **adam)
    # one model per prepare, as FSDP2 asks; under FSDP the EMA is sharded as the generator is (its updates are
    # elementwise over the shards), the frozen teacher unless --fsdp-teacher replicate; all as they are otherwise
    generator, generator_optimizer = accelerator.prepare(generator, generator_optimizer)
    fake, fake_optimizer = accelerator.prepare(fake, fake_optimizer)
    if ema is not None:
        ema.model = shard_frozen(accelerator, ema.model)
    teacher = dataclasses.replace(teacher, unet=shard_frozen(accelerator, teacher.unet, cfg.fsdp_teacher == "shard"))
    return SidNetworks(teacher, generator, fake, generator_optimizer, fake_optimizer, ema)


@dataclass
class SidLoop:
    """What one iteration needs besides its state: the networks, the prompts and the text they encode to."""

    cfg: SidConfig
    accelerator: Any
    nets: SidNetworks
    sampler: PromptSampler
    encoder: CountingEncoder
    text_cache: TextEmbeddingCache
    uncond: Conditioning
    latent_shape: tuple[int, ...]
    global_batch: int

    @classmethod
    def build(cls, cfg: SidConfig, accelerator, prompts: list[str]) -> "SidLoop":
        nets = build_networks(cfg, accelerator)
        shape = latent_shape(nets.teacher.unet)
        encoder = CountingEncoder(nets.teacher, shape[-1] * nets.teacher.vae_scale_factor)
        text_cache = TextEmbeddingCache(encoder, cfg.text_cache_size)
        return cls(cfg, accelerator, nets, PromptSampler(prompts, cfg.seed), encoder, text_cache, text_cache([""]),
                   shape,
                   cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes)

    def iteration(self, state: SidState) -> list[StepResult]:
        """One SiD iteration: the fake network's step, the generator's, the EMA; `state` counts it."""
        steps = [network_step(self.cfg, self.accelerator, self.nets, phase, self.sampler, self.text_cache,
                              self.uncond, state.iteration, self.latent_shape) for phase in (FAKE, GENERATOR)]
        if self.nets.ema is not None:
            self.nets.ema.update(_unwrap(self.nets.generator), self.global_batch, state.images)
        state.iteration += 1
        state.images += self.global_batch
        for phase, step in enumerate(steps):
            state.count(phase, step, self.global_batch)
        return steps


def _crossed(images: int, batch: int, every_kimg: float) -> bool:
    """Did the last `batch` images cross a multiple of every_kimg thousand?"""
    every = every_kimg * 1000
    return every > 0 and images // every > (images - batch) // every


def nonfinite_stop(state: SidState, limit: int) -> str | None:
    """The one error line once a network's last `limit` optimiser steps were all skipped, else None."""
    for phase, name in enumerate(NETWORK_NAMES):
        if (in_a_row := state.skipped_in_a_row[phase]) >= limit:
            return (f"stopped at {state.images / 1000:g} kimg: the {name}'s last {in_a_row} optimiser steps were "
                    "skipped, with no finite sample in their batches (lower --lr, or try --mixed-precision bf16/no)")
    return None


def _record(cfg: SidConfig, prompt_list, encoder, nets, state: SidState, global_batch: int) -> dict[str, Any]:
    """distillation.json of a one-step generator: how to sample it and where it came from."""
    recent = list(state.recent_generator)
    schedule = nets.teacher.schedule
    t_init = torch.tensor([cfg.t_init])
    return {
        "method": "sid-lsg",
        "guidance": {"kappa1": cfg.kappa1, "kappa2": cfg.kappa2, "kappa3": cfg.kappa3, "kappa4": cfg.kappa4,
                     "strategy": cfg.strategy, "alpha": cfg.alpha},
        "guidance_scale": None,
        "t_init": cfg.t_init, "t_range": [cfg.t_min, cfg.t_max],
        "input_scale": float(schedule.sigma(t_init, t_init.double())),
        "teacher": {"path": str(Path(nets.teacher.root).resolve()), "fingerprint": nets.teacher.fingerprint,
                    "variants": nets.teacher.variants},
        "prompts": {"path": str(Path(cfg.prompts).resolve()), "sha256": prompt_list.sha256,
                    "count": len(prompt_list.prompts), "empty_lines_skipped": prompt_list.empty_skipped,
                    "undecodable_lines_skipped": prompt_list.undecodable_skipped,
                    "truncated_by_tokenizer_seen": encoder.truncated},
        "kimg": state.images / 1000, "iterations": state.iteration, "global_batch_size": global_batch,
        "ema_halflife_kimg": cfg.ema_halflife_kimg, "mixed_precision": cfg.mixed_precision,
        "dropped_nonfinite_samples": state.dropped_samples, "skipped_optimizer_steps": state.skipped_steps,
        "cleaned_gradient_steps": state.cleaned_steps,
        "final_losses": {"generator_mean_recent": sum(recent) / len(recent) if recent else None,
                         "fake_score_mean_recent": (sum(state.recent_fake) / len(state.recent_fake)
                                                    if state.recent_fake else None)},
        "inference": {"sampler": "sid-one-step", "t_init": cfg.t_init, "unet_passes_per_image": 1,
                      "x_g": "unet(sqrt(1 - alphabar[t_init]) z, t_init, c) read as x0; decode with the VAE in fp32",
                      "command": "evaluation generate --model OUT --prompt TEXT --seed N --out FILE.png",
                      "pipeline": f"{pipeline_class(nets.teacher.root)} with {TRAILING_EULER[0].__name__} "
                                  f"(trailing; OUT's own), timesteps=[{cfg.t_init}], guidance_scale=1.0: the same "
                                  "x_g and image",
                      "scheduler": scheduler_entry(TRAILING_EULER),
                      "call": f"{scheduler_code(*TRAILING_EULER)}\nimage = pipe(prompt, timesteps=[{cfg.t_init}], "
                              f"guidance_scale=1.0, {SEEDED}).images[0]"},
    }


def run_sid(cfg: SidConfig, after_step: AfterStep | None = None) -> dict[str, Any]:
    """Train (or resume) and export. Returns status ("done" or "interrupted"), iteration, kimg, the last
    losses and each iteration's seconds; `after_step(seconds)` is called after each iteration, outside its
    time (benchmarks interleave other work there)."""
    quiet_library_progress()
    # SiD-LSG runs fp16 without a loss scaler, as the official code does (`sid_training_loop.py`: fp16 weights,
    # plain `loss.backward()`, nan_to_num, `g_optimizer.step()`). With accelerate's scaler, a single non-finite
    # gradient value (a NaN born in the trained network leaves some: see `clean_gradients`) makes it skip the
    # whole optimiser step and halve its scale before nan_to_num can run, and it skips the first steps while
    # backing off from 2^16. Underflow, what a scaler guards against, is the smaller risk here: both losses are
    # sums over elements divided by the batch, not means. Autocast is unchanged; the weights stay float32.
    accelerator = make_accelerator(cfg, grad_scaler=False)
    prompt_list = read_prompts(cfg.prompts, cfg.prompt_column)
    prepare_out(cfg, accelerator, (cfg.teacher, cfg.prompts))
    loop = SidLoop.build(cfg, accelerator, prompt_list.prompts)
    nets, global_batch = loop.nets, loop.global_batch

    run = {"identity": cfg.identity(), "data_layout": {"world_size": accelerator.num_processes},
           "teacher_fingerprint": nets.teacher.fingerprint, "data_sha256": prompt_list.sha256}
    state = SidState()
    if (resumed := resume_checkpoint(Path(cfg.out), cfg.resume, run, accelerator, nets.parts())) is not None:
        state = SidState.from_dict(resumed[1])
        accelerator.print(f"resumed from {resumed[0]} at {state.images / 1000:g} kimg")

    def checkpoint() -> None:
        save_checkpoint(Path(cfg.out), state.iteration, run, cfg.to_dict(), accelerator, nets.parts(),
                        state.to_dict(), cfg.checkpoints_total_limit)

    init_trackers(cfg, accelerator, "fit-sid-lsg")
    grid = Validation(nets.teacher, prompt_list.prompts[:cfg.grid_prompts], loop.latent_shape, Path(cfg.out),
                      accelerator)

    def draw_grid() -> None:  # OUT/samples/kimg-*.png of the EMA generator, logged at the iteration
        generator = unsharded(nets.sampling_generator(), accelerator.device)  # FSDP: gathered onto the main one
        if accelerator.is_main_process:
            grid(sid_sampler(generator, nets.teacher.schedule, cfg.t_init), kimg_label(state.images), state.iteration)

    if cfg.grid_every_kimg > 0 and state.images == 0:
        draw_grid()
    max_images = math.ceil(cfg.max_kimg * 1000)
    status, seconds = "done", []
    progress_bar = tqdm(total=max_images, initial=min(state.images, max_images), desc="fit sid-lsg", unit="img",
                        unit_scale=True, disable=not accelerator.is_main_process)
    with StopRequest() as stop, progress_bar as progress:
        while state.images < max_images:
            started = time.perf_counter()
            steps = loop.iteration(state)
            requested = torch.tensor([float(stop.requested)], device=accelerator.device)
            stop.agreed |= bool(accelerator.reduce(requested, "sum") > 0)
            seconds.append(time.perf_counter() - started)
            if after_step is not None:
                after_step(seconds[-1])
            losses = {"loss_fake_score": steps[FAKE].mean_loss, "loss_generator": steps[GENERATOR].mean_loss,
                      "kimg": state.images / 1000}
            progress.update(global_batch)
            progress.set_postfix(fake=f"{losses['loss_fake_score']:.4g}", gen=f"{losses['loss_generator']:.4g}")
            if state.iteration % cfg.log_every == 0:
                accelerator.log({**losses, **state.nonfinite_counts()}, step=state.iteration)
            if (message := nonfinite_stop(state, cfg.max_nonfinite_steps)) is not None:
                checkpoint()
                raise NonFiniteSteps(message)
            if _crossed(state.images, global_batch, cfg.grid_every_kimg):
                draw_grid()
            done = state.images >= max_images
            if done or stop.agreed or _crossed(state.images, global_batch, cfg.checkpoint_every_kimg):
                checkpoint()
            if stop.agreed and not done:
                status = "interrupted"
                break
    if status == "done":
        generator = unsharded(nets.sampling_generator())  # FSDP: gathered whole onto the main process's CPU
        if accelerator.is_main_process:
            record = _record(cfg, prompt_list, loop.encoder, nets, state, global_batch)
            save_trained_student(generator, cfg.lora, nets.teacher.root, cfg.variant,
                                 Path(cfg.out), record, cfg.merge)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"status": status, "iteration": state.iteration, "kimg": state.images / 1000,
            "loss_generator": state.recent_generator[-1] if state.recent_generator else math.nan,
            "loss_fake_score": state.recent_fake[-1] if state.recent_fake else math.nan,
            **state.nonfinite_counts(), "iteration_seconds": seconds}
