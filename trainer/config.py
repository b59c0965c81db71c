"""`trainer fit`'s configuration: one dataclass that the click command and the --config file both fill."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from diffusion.errors import UserError
from diffusion.guidance import COEFFICIENTS, DEFAULT_COEFFICIENT

# method -> the shard kind it reads
SHARD_KIND = {"cfg-distill": "cfg", "classifier-distill": "classifier", "w-distill": "cfg"}
DEFAULT_GUIDANCE_SCALE = {"cfg-distill": 7.5, "classifier-distill": 100.0}
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
W_LOSSES = ("x0", "eps")
FSDP_TEACHER = ("shard", "replicate")  # a frozen teacher UNet under FSDP (progressive, sid-lsg)
# FitConfig's options that only some of its methods take: given to another method, they are refused by name
METHOD_ONLY_OPTIONS = {
    "guidance_scale": ("cfg-distill", "classifier-distill"),
    "guidance_coefficient": ("classifier-distill",),
    "w_min": ("w-distill",), "w_max": ("w-distill",), "w_embedding_dim": ("w-distill",), "w_loss": ("w-distill",),
}


def options_of_other_methods(method: str, given) -> list[str]:
    """The options among `given` that FitConfig holds for its other methods only (METHOD_ONLY_OPTIONS)."""
    if method not in SHARD_KIND:
        return []
    return sorted(k for k in given if method not in METHOD_ONLY_OPTIONS.get(k, (method,)))


def fsdp_not_supported(method: str, lora: bool) -> str | None:
    """Why FSDP (--fsdp, or an accelerate FSDP config) cannot run this configuration yet, or None if it can
    (trainer.fsdp: full students of every method, LoRA students of cfg-, classifier- and w-distill)."""
    if lora and method not in SHARD_KIND:
        return (f"FSDP (--fsdp, or an accelerate FSDP config) with --lora-rank is not supported yet for --method "
                f"{method}: its adapters share one UNet, which a LoRA run holds once (run it under DDP)")
    return None


def check_fsdp_options(config) -> None:
    """--fsdp with what FSDP does not run yet, or --fsdp-teacher without FSDP's choices: one line."""
    if config.fsdp and (problem := fsdp_not_supported(config.method, config.lora is not None)):
        raise UserError(problem)
    if hasattr(config, "fsdp_teacher"):
        require_choice("fsdp-teacher", config.fsdp_teacher, FSDP_TEACHER)


def require_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown --{option} {value!r}; expected one of {choices}")


def require_one_way_to_start(config) -> None:
    """--resume continues the run in OUT and --overwrite starts it over: not both."""
    if config.resume and config.overwrite:
        raise UserError("--overwrite starts over and --resume continues: pass one of them, not both")


def require_at_least_one(config, names: tuple[str, ...]) -> None:
    """Each named integer option of `config` is 1 or more."""
    for name in names:
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


def lora_spec(config):
    """--lora-rank, --lora-alpha, --lora-targets as a trainer.student.LoraSpec (None: a full student)."""
    from trainer.student import LoraSpec

    return LoraSpec.from_options(config.lora_rank, config.lora_alpha, config.lora_targets)


def lora_identity(config) -> dict[str, Any]:
    """A LoRA run's adapter is part of what it is; a full student's identity holds nothing of it (as before)."""
    return {"lora": config.lora.to_dict()} if config.lora is not None else {}


@dataclass(kw_only=True)
class ShardLoopConfig:
    """What every loop fed from shards takes: the data stream, the optimiser, precision, EMA, checkpoints, logs."""

    shards: str
    out: str
    batch_size: int = 8  # per process, per micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 1e-5
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    keep_grad_buffers: bool = False  # zero gradients in place between steps instead of freeing them (trainer.optim)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    xformers: bool = False
    ema_decay: float = 0.9999  # 0 disables EMA; with warm-up (diffusers' EMAModel, power 2/3)
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # start over in an OUT that holds a run (not part of the run's identity)
    seed: int = 0
    resampled: bool = True
    shuffle_buffer: int = 1000
    num_workers: int | None = None  # DataLoader workers: 2 with CUDA; 0 on CPU, where workers take the step's cores
    text_cache_size: int = 1024
    report_to: str = "tensorboard"
    log_every: int = 10
    validate_every: int = 0  # validation grids every N steps (trainer.validation; 0: none)
    validation_prompts: str | None = None  # their prompts, seed i for prompt i (needed by validate_every)
    max_nonfinite_steps: int = 10  # in a row
    record_keys: bool = False  # audit: which records each rank trained on
    verify: bool = False  # also check every shard's sha256 at start-up (sizes are always checked)
    lora_rank: int = 0  # 0: train the whole UNet; R: a rank-R LoRA adapter on the frozen UNet (trainer.student)
    lora_alpha: float | None = None  # the adapter's output is scaled by alpha / rank [rank]
    lora_targets: str | None = None  # comma-separated module names [trainer.student.DEFAULT_LORA_TARGETS]
    merge: bool = False  # LoRA: also write the merged pipeline (base + adapter in one UNet) into OUT
    fsdp: bool = False  # shard the student, its gradients, AdamW state and EMA over the processes (trainer.fsdp)

    def __post_init__(self) -> None:
        require_choice("lr-scheduler", self.lr_scheduler, LR_SCHEDULES)
        require_choice("mixed-precision", self.mixed_precision, MIXED_PRECISION)
        require_at_least_one(self, ("batch_size", "gradient_accumulation_steps", "checkpoint_every",
                                    "checkpoints_total_limit", "max_nonfinite_steps", "log_every"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require_one_way_to_start(self)
        if self.validate_every < 0:
            raise UserError(f"--validate-every must be 0 (no validation) or more, got {self.validate_every}")
        if self.validate_every and not self.validation_prompts:
            raise UserError("--validate-every needs --validation-prompts FILE: the prompts of the validation grids")
        self.lora  # refuses bad LoRA options before any work
        check_fsdp_options(self)

    @property
    def lora(self):
        """The LoRA adapter to train, or None for a full student."""
        return lora_spec(self)

    @property
    def loader_workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        import torch

        return 2 if torch.cuda.is_available() else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def data_layout(self, world_size: int) -> dict[str, Any]:
        """What a resume may change, at the price of a different data order from there on."""
        keys = ("resampled", "shuffle_buffer") + (("checkpoint_every",) if self.resampled else ())
        return {"world_size": world_size, "num_workers": self.loader_workers, **{k: getattr(self, k) for k in keys}}


@dataclass(kw_only=True)
class FitConfig(ShardLoopConfig):
    """cfg-distill, classifier-distill and w-distill."""

    method: str
    teacher: str
    variant: str | None = None  # the teacher's weight variant (e.g. fp16) [what its folder has]
    guidance_scale: float | None = None  # alpha (cfg-distill) or gamma (classifier-distill)
    guidance_coefficient: str | None = None  # classifier-distill: c_t in eps + gamma c_t grad [the shards']
    w_min: float = 2.0  # w-distill: the guidance-scale range, in diffusers' guidance_scale units
    w_max: float = 14.0
    w_embedding_dim: int = 256
    w_loss: str | None = None  # w-distill: "x0" (seed 001's max(SNR, 1)-weighted x loss) or "eps" [x0]
    max_steps: int = 1000

    def __post_init__(self) -> None:
        if self.method not in SHARD_KIND:
            raise UserError(f"unknown --method {self.method!r}; expected one of {sorted(SHARD_KIND)}")
        super().__post_init__()
        if self.guidance_scale is None and self.method in DEFAULT_GUIDANCE_SCALE:
            self.guidance_scale = DEFAULT_GUIDANCE_SCALE[self.method]
        if self.method == "w-distill" and not self.w_min <= self.w_max:
            raise UserError(f"--w-min {self.w_min} is above --w-max {self.w_max}")
        if self.method == "w-distill":
            self.w_loss = self.w_loss or "x0"
            require_choice("w-loss", self.w_loss, W_LOSSES)
        require_at_least_one(self, ("max_steps",))
        if self.guidance_coefficient is not None:
            require_choice("guidance-coefficient", self.guidance_coefficient, COEFFICIENTS)

    @property
    def shard_kind(self) -> str:
        return SHARD_KIND[self.method]

    def identity(self) -> dict[str, Any]:
        """What a resume must not change: it would be another training run."""
        keys = ("method", "guidance_scale", "w_min", "w_max", "w_embedding_dim", "batch_size",
                "gradient_accumulation_steps", "seed")
        identity = {k: getattr(self, k) for k in keys}
        if self.w_loss == "x0":  # absent: the eps loss, as before the option
            identity["w_loss"] = self.w_loss
        if self.guidance_coefficient not in (None, DEFAULT_COEFFICIENT):  # absent: sqrt-beta, as before the option
            identity["guidance_coefficient"] = self.guidance_coefficient
        return {**identity, **lora_identity(self)}


@dataclass(kw_only=True)
class ProgressiveConfig(ShardLoopConfig):
    """progressive: halve the sampling steps of a w-conditioned student, round after round (Meng et al. stage 2)."""

    student: str  # a w-distill student (or a progressive round folder, to go on from it)
    method: str = "progressive"
    start_steps: int = 64  # the steps the starting student is sampled with: the first round's teacher
    end_steps: int = 1  # the last round's student
    iters_per_round: int = 1000  # optimiser steps per round
    w_min: float | None = None  # the w range to train on [the student's own]
    w_max: float | None = None
    lr_scheduler: str = "constant"  # per round
    lr_warmup_steps: int = 0
    fsdp_teacher: str = "shard"  # with FSDP, the round's frozen teacher: "shard" (as the student) or "replicate"

    def __post_init__(self) -> None:
        if self.method != "progressive":
            raise UserError(f"ProgressiveConfig is for --method progressive, not {self.method!r}")
        super().__post_init__()
        require_at_least_one(self, ("iters_per_round",))
        ratio = self.start_steps / max(self.end_steps, 1)
        if self.end_steps < 1 or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
            raise UserError(f"--start-steps {self.start_steps} must be --end-steps {self.end_steps} times a power "
                            "of two (at least one halving)")
        if self.w_min is not None and self.w_max is not None and self.w_min > self.w_max:
            raise UserError(f"--w-min {self.w_min} is above --w-max {self.w_max}")

    @property
    def round_steps(self) -> list[int]:
        """Each round's student steps: start/2, start/4, ..., end."""
        steps, out = self.start_steps, []
        while steps > self.end_steps:
            steps //= 2
            out.append(steps)
        return out

    def identity(self) -> dict[str, Any]:
        keys = ("method", "start_steps", "end_steps", "iters_per_round", "w_min", "w_max", "batch_size",
                "gradient_accumulation_steps", "seed")
        return {**{k: getattr(self, k) for k in keys}, **lora_identity(self)}
