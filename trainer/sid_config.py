"""`trainer fit --method sid-lsg`'s configuration: one dataclass that the click command and --config both fill.

Guidance strategies (SiD-LSG, section 3) by the four scales:
kappa1: the fake score network's training target; kappa2 = kappa3: the fake network in the generator loss;
kappa4: the teacher in the generator loss. `--kappa K` sets all four (LSG); Long guidance is kappa4 > 1 only,
Short guidance kappa2 = kappa3 < 1, the "simplest" LSG kappa1 > 1 only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from diffusion.errors import UserError
from trainer.config import (MIXED_PRECISION, check_fsdp_options, lora_identity, lora_spec, require_at_least_one,
                            require_choice, require_one_way_to_start)


@dataclass
class SidConfig:
    teacher: str
    prompts: str
    out: str
    method: str = "sid-lsg"
    variant: str | None = None  # the teacher's weight variant (e.g. fp16) [what its folder has]
    prompt_column: str = "caption"  # parquet/csv prompt files
    kappa: float = 1.5  # kappa1..kappa4 unless set one by one
    kappa1: float | None = None
    kappa2: float | None = None
    kappa3: float | None = None
    kappa4: float | None = None
    alpha: float = 1.0
    t_init: int = 625
    t_min: int = 20
    t_max: int = 979  # t ~ U{t_min, ..., t_max}
    prompt_dropout: float = 0.1  # "" for the fake network's prompts when kappa1, kappa2 or kappa3 != 1
    batch_size: int = 8  # per process, per micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 1e-6  # the generator's
    lr_fake: float | None = None  # the fake score network's [= lr]
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    adam_epsilon: float | None = None  # 1e-8, or 1e-6 under fp16
    keep_grad_buffers: bool = False  # zero gradients in place between steps instead of freeing them (trainer.optim)
    ema_halflife_kimg: float = 50.0  # 0: no EMA
    ema_rampup: float = 0.05  # half-life at most ema_rampup x images seen
    mixed_precision: str = "no"
    teacher_precision: str | None = None  # the frozen teacher's weights: fp32, fp16 or bf16 [follows --mixed-precision]
    gradient_checkpointing: bool = False
    xformers: bool = False
    max_kimg: float = 20000.0  # thousands of generated images (the seed's 20M for FID 8.15)
    checkpoint_every_kimg: float = 100.0
    checkpoints_total_limit: int = 3
    grid_every_kimg: float = 50.0  # sample grids of the EMA generator (0: none)
    grid_prompts: int = 16  # the first N prompts of the file, seeds 0..N-1
    resume: str | None = None
    overwrite: bool = False  # start over in an OUT that holds a run (not part of the run's identity)
    seed: int = 0
    text_cache_size: int = 4096
    report_to: str = "tensorboard"
    log_every: int = 10  # iterations
    max_nonfinite_steps: int = 10  # optimiser steps in a row (of one network) skipped: no finite sample
    lora_rank: int = 0  # 0: full generator and fake network; R: rank-R adapters on the teacher's own UNet
    lora_alpha: float | None = None  # [rank]
    lora_targets: str | None = None  # comma-separated module names [trainer.student.DEFAULT_LORA_TARGETS]
    merge: bool = False  # LoRA: also write the merged pipeline (teacher + generator adapter) into OUT
    fsdp: bool = False  # shard the generator, the fake network, their Adam states and the EMA (trainer.fsdp)
    fsdp_teacher: str = "shard"  # with FSDP, the frozen teacher UNet: "shard" (as the others) or "replicate"

    def __post_init__(self) -> None:
        if self.method != "sid-lsg":
            raise UserError(f"SidConfig is for --method sid-lsg, not {self.method!r}")
        for name in ("kappa1", "kappa2", "kappa3", "kappa4"):
            if getattr(self, name) is None:
                setattr(self, name, self.kappa)
        if self.lr_fake is None:
            self.lr_fake = self.lr
        if self.adam_epsilon is None:
            self.adam_epsilon = 1e-6 if self.mixed_precision == "fp16" else 1e-8
        require_choice("mixed-precision", self.mixed_precision, MIXED_PRECISION)
        if self.teacher_precision is None:
            self.teacher_precision = {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)
        if not 0 < self.t_min <= self.t_max:
            raise UserError(f"need 0 < --t-min <= --t-max, got {self.t_min} and {self.t_max}")
        if not 0 < self.t_init:
            raise UserError(f"--t-init must be positive, got {self.t_init}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise UserError(f"--prompt-dropout must be in [0, 1), got {self.prompt_dropout}")
        require_at_least_one(self, ("batch_size", "gradient_accumulation_steps", "checkpoints_total_limit",
                                    "log_every", "max_nonfinite_steps", "grid_prompts"))
        for name in ("max_kimg", "checkpoint_every_kimg"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.ema_halflife_kimg < 0 or self.grid_every_kimg < 0:
            raise UserError("--ema-halflife-kimg and --grid-every-kimg must be >= 0")
        require_one_way_to_start(self)
        if self.lora is not None and self.gradient_checkpointing:
            # the three adapters share one UNet and the active one is module state: a checkpointed block's
            # recomputation in the backward would run with the adapter of the last forward, not its own
            raise UserError("--gradient-checkpointing does not apply to sid-lsg with --lora-rank (one UNet carries "
                            "the generator's, the fake network's and the teacher's passes)")
        check_fsdp_options(self)

    @property
    def lora(self):
        """The LoRA adapters' shape (generator and fake network alike), or None for full networks."""
        return lora_spec(self)

    @property
    def kappas(self) -> tuple[float, float, float, float]:
        return (self.kappa1, self.kappa2, self.kappa3, self.kappa4)

    @property
    def uses_dropout(self) -> bool:
        """The seed drops prompts for the fake network when its guidance is on: `cfg_train_fake != 1 or
        cfg_eval_fake != 1` in the official `sid_training_loop.py`, where cfg_eval_fake is kappa2 = kappa3. With
        kappa3 set on its own, any of kappa1, kappa2, kappa3 != 1 needs the fake network's unconditional branch."""
        return any(k != 1.0 for k in (self.kappa1, self.kappa2, self.kappa3))

    @property
    def strategy(self) -> str:
        k1, k2, k3, k4 = self.kappas
        if k1 == k2 == k3 == k4:
            return "none (kappa = 1)" if k1 == 1.0 else "LSG"
        if k1 == 1.0 and k2 == k3 == 1.0 and k4 > 1.0:
            return "Long"
        if k1 == 1.0 and k4 == 1.0 and k2 == k3 < 1.0:
            return "Short"
        if k1 > 1.0 and k2 == k3 == k4 == 1.0:
            return "simplest LSG"
        return "custom"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What a resume must not change: it would be another training run."""
        keys = ("method", "kappa1", "kappa2", "kappa3", "kappa4", "alpha", "t_init", "t_min", "t_max",
                "prompt_dropout", "batch_size", "gradient_accumulation_steps", "seed")
        return {**{k: getattr(self, k) for k in keys}, **lora_identity(self)}
