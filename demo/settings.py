"""The demo's numbers in one place: the full run (`make demo`) and the fast one the test suite runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from digits.variant import VariantRecipe
from digits.world import FAST as FAST_WORLD
from digits.world import WorldRecipe


@dataclass(frozen=True)
class DemoSettings:
    world: WorldRecipe = field(default_factory=WorldRecipe)
    shard_samples: int = 100000  # every train record
    alpha: float = 3.0  # the CFG scale distilled into student-cfg (and the CFG teacher it is compared with)
    gamma: float = 250.0  # blue-tone guidance strength (Whitaker's mean |B - 0.9|: 250 matches the blue fraction the old loss gave at 1000)
    w_min: float = 1.0
    w_max: float = 6.0
    fit_steps: int = 1000
    fit_batch: int = 64
    fit_lr: float = 1e-4
    sid_kappa: float = 3.0  # SiD-LSG's kappa1..4, the same scale as alpha so Table 5 compares like with like
    sid_kimg: float = 12.8  # thousands of generated images
    sid_batch: int = 64
    sid_lr: float = 5e-5  # the seed's 1e-6 is for SD at batch 512; this small UNet takes far larger steps
    sid_ema_kimg: float = 2.0
    progressive_start_steps: int = 16  # the w-student's steps; rounds give 8, 4, 2, 1
    progressive_iters: int = 200  # per round
    progressive_lr: float = 5e-5  # the x0 loss of an eps-student at t = 999 weighs eps errors by (sigma/a)^2
    few_steps: tuple[int, ...] = (1, 2, 4, 8)  # the step counts compared in the report
    stochastic_steps: tuple[int, ...] = (4, 8)  # ... with Meng et al.'s stochastic sampler too
    w_loss_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)  # --compare-w-loss: the w-students at these scales
    lora_rank: int = 8  # the LoRA students (cfg-distill, sid-lsg): otherwise the full students' settings
    variant: VariantRecipe = field(default_factory=VariantRecipe)  # the red-ink fine-tune the cfg LoRA is applied to
    sdxl_samples: int = 256  # the SDXL-layout chain (demo/sdxl.py): records, and cfg-distill steps on them
    sdxl_fit_steps: int = 60
    eval_images: int = 300
    sample_steps: int = 25
    sweep_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    speed_batch: int = 16
    speed_repeats: int = 3

    def blue_models(self, teacher: Path, root: Path) -> dict[str, str]:
        """Blue-tone guidance: the teacher it starts from (conditional, no CFG), the blue-guided teacher, and the
        distilled student; each sampled at guidance 1 apart from the classifier guidance itself."""
        return {"teacher-cond": f"{teacher}@cfg=1", "teacher-blue": f"{teacher}@blue={self.gamma}",
                "student-blue": str(root / "student-blue")}

    def lora_module_models(self, teacher: Path, root: Path) -> dict[str, tuple[str, str, int]]:
        """name -> (label, model argument, UNet passes per step) of the LoRA-as-acceleration-module table: the
        red-ink variant unguided and with CFG, the variant with the cfg LoRA learnt on the base folded in, and
        the base teacher with CFG and with that LoRA for reference."""
        variant, a = root / "variant-red", self.alpha
        return {"variant-cond": ("red-ink variant, no guidance", f"{variant}@cfg=1", 1),
                "variant-cfg": (f"red-ink variant, CFG {a:g}", f"{variant}@cfg={a}", 2),
                "variant-lora": ("red-ink variant + base's cfg LoRA", str(root / "student-cfg-lora-on-variant"), 1),
                "teacher-cfg": (f"base teacher, CFG {a:g}", f"{teacher}@cfg={a}", 2),
                "teacher-lora": ("base teacher + its cfg LoRA", str(root / "student-cfg-lora"), 1)}


FULL = DemoSettings()
FAST = DemoSettings(world=FAST_WORLD, shard_samples=64, fit_steps=4, fit_batch=8, sid_kimg=0.016, sid_batch=8,
                    sid_ema_kimg=0.008, progressive_start_steps=4, progressive_iters=2, few_steps=(1, 2),
                    stochastic_steps=(2,), w_loss_scales=(1.0, 3.0),
                    variant=VariantRecipe(steps=2, batch_size=8, colourings=1), sdxl_samples=16, sdxl_fit_steps=2,
                    eval_images=16, sample_steps=3,
                    sweep_scales=(1.0, 3.0), speed_batch=2, speed_repeats=1)
