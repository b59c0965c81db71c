"""The demo's numbers in one place: the full run (`make demo`) and the fast one the test suite runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


FULL = DemoSettings()
FAST = DemoSettings(world=FAST_WORLD, shard_samples=64, fit_steps=4, fit_batch=8, sid_kimg=0.016, sid_batch=8,
                    sid_ema_kimg=0.008, progressive_start_steps=4, progressive_iters=2, few_steps=(1, 2),
                    stochastic_steps=(2,), w_loss_scales=(1.0, 3.0), eval_images=16, sample_steps=3,
                    sweep_scales=(1.0, 3.0), speed_batch=2, speed_repeats=1)
