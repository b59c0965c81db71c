"""Exponential moving averages of weights, both updated by one multi-tensor kernel (`lerp_toward_`):

- `HalfLifeEMA`, by half-life in images with ramp-up (Karras et al. 2022, EDM's training loop; SiD uses it),
  a frozen copy of the network (sid-lsg samples its grids from it and exports it);
- `WarmupEMA`, diffusers' EMAModel (decay with warm-up, `store`/`copy_to`/`restore`, its state_dict: so
  checkpoints keep their format) with its update done by the same kernel (cfg-, classifier-, w-distill and
  progressive).

One `torch._foreach_lerp_` over all tensors costs about 0.4x a lerp and a copy per tensor, or diffusers' own
update, foreach or not (benchmarks/README.md). The result differs from those only in rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


@torch.no_grad()
def lerp_toward_(averages: list[torch.Tensor], currents: list[torch.Tensor], weight: float) -> None:
    """average <- average + weight (current - average) for every pair, in one multi-tensor kernel; weight is
    1 - decay."""
    torch._foreach_lerp_(averages, [c.detach() for c in currents], weight)


def ema_beta(batch_images: int, images_seen: int, halflife_kimg: float, rampup: float | None) -> float:
    """The decay for one update of `batch_images` images: 0.5 ** (batch / halflife), the half-life in images
    capped at rampup x images seen so far (so the average forgets the initialisation early)."""
    halflife = halflife_kimg * 1000.0
    if rampup is not None and rampup > 0:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


class HalfLifeEMA:
    """A frozen copy of `model` whose weights trail the model's; state_dict()/load_state_dict() for checkpoints.
    `average` is the module to hold the average (a LoRA generator's: another adapter on the same base, see
    trainer.student.AdapterView), set to the model's weights; default: a deep copy of `model`."""

    def __init__(self, model: torch.nn.Module, halflife_kimg: float, rampup: float | None,
                 average: torch.nn.Module | None = None):
        self.model = (copy.deepcopy(model) if average is None else average).eval().requires_grad_(False)
        if average is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(average.parameters()), list(model.parameters()))
        self.halflife_kimg, self.rampup = halflife_kimg, rampup

    @torch.no_grad()
    def update(self, source: torch.nn.Module, batch_images: int, images_seen: int) -> None:
        beta = ema_beta(batch_images, images_seen, self.halflife_kimg, self.rampup)
        lerp_toward_(list(self.model.parameters()), list(source.parameters()), 1.0 - beta)
        if buffers := list(self.model.buffers()):
            torch._foreach_copy_(buffers, list(source.buffers()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class WarmupEMA(EMAModel):
    """diffusers' EMAModel (same decay schedule, same state_dict) whose step is one `lerp_toward_` over the
    trained parameters; frozen ones are copied, as EMAModel does. EMAModel's DeepSpeed ZeRO-3 gathering is
    left out: the trainer does not run under DeepSpeed."""

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        pairs = list(zip(self.shadow_params, parameters))
        lerp_toward_([s for s, p in pairs if p.requires_grad], [p for _, p in pairs if p.requires_grad], 1.0 - decay)
        if frozen := [(s, p) for s, p in pairs if not p.requires_grad]:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
