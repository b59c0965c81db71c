"""EMA of a network by half-life in images, with ramp-up (Karras et al. 2022, EDM's training loop; SiD uses it)."""

from __future__ import annotations

import copy

import torch


def ema_beta(batch_images: int, images_seen: int, halflife_kimg: float, rampup: float | None) -> float:
    """The decay for one update of `batch_images` images: 0.5 ** (batch / halflife), the half-life in images
    capped at rampup x images seen so far (so the average forgets the initialisation early)."""
    halflife = halflife_kimg * 1000.0
    if rampup is not None and rampup > 0:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


class HalfLifeEMA:
    """A frozen copy of `model` whose weights trail the model's; state_dict()/load_state_dict() for checkpoints."""

    def __init__(self, model: torch.nn.Module, halflife_kimg: float, rampup: float | None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_kimg, self.rampup = halflife_kimg, rampup

    @torch.no_grad()
    def update(self, source: torch.nn.Module, batch_images: int, images_seen: int) -> None:
        beta = ema_beta(batch_images, images_seen, self.halflife_kimg, self.rampup)
        for average, current in zip(self.model.parameters(), source.parameters()):
            average.copy_(current.detach().lerp(average, beta))
        for average, current in zip(self.model.buffers(), source.buffers()):
            average.copy_(current)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
