"""What a text-to-image UNet takes besides z_t and t: one type for every teacher family.

SD 1.x/2.x: the text encoder's hidden states. SDXL adds the pooled text embedding of its second encoder and
`add_time_ids`, the micro-conditioning (original size, crop top-left, target size) of each sample. The teacher
wrapper builds it (`Teacher.encode_text`); loops, losses and samplers only batch it, move it and pass it on, so
they never ask which family they run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch

MICRO_FIELDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


def square_micro(size: int) -> list[int]:
    """The micro-conditioning of an uncropped square image of `size` pixels rendered at that size (what
    StableDiffusionXLPipeline uses by default: original size = target size = the output's, crop (0, 0))."""
    return [size, size, 0, 0, size, size]


@dataclass(frozen=True)
class Conditioning:
    """`hidden` (B, L, D); for SDXL also `pooled` (B, P) and `time_ids` (B, 6), one row per sample."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _parts(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in (("hidden", self.hidden), ("pooled", self.pooled),
                                                 ("time_ids", self.time_ids)) if value is not None}

    def _map(self, fn) -> "Conditioning":
        return replace(self, **{name: fn(value) for name, value in self._parts().items()})

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, rows: slice) -> "Conditioning":
        """A slice of the rows, like a tensor's first dimension."""
        return self._map(lambda value: value[rows])

    def rows(self) -> Iterator["Conditioning"]:
        """One single-row Conditioning per sample."""
        return (self[i:i + 1] for i in range(len(self)))

    def expand(self, batch: int) -> "Conditioning":
        """A one-row conditioning repeated to `batch` rows (a view, like Tensor.expand); others as they are."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of {len(self)} rows to {batch}")
        return self._map(lambda value: value.expand(batch, *value.shape[1:]))

    def with_micro(self, micro: torch.Tensor | None) -> "Conditioning":
        """The same text with the given micro-conditioning as time ids: one row per sample (B, 6), or one (6,)
        for all, for a UNet that takes them; unchanged when there is none to set (SD records, or a family
        without time ids)."""
        if micro is None or self.time_ids is None:
            return self
        micro = torch.as_tensor(micro, dtype=self.time_ids.dtype, device=self.time_ids.device)
        return replace(self, time_ids=micro.reshape(-1, len(MICRO_FIELDS)).expand(len(self), -1))

    def paired_with(self, uncond: "Conditioning") -> "Conditioning":
        """The 2B-row batch of one CFG forward: these rows, then `uncond` (one row, or one per sample). The
        unconditional half takes these rows' time ids, as StableDiffusionXLPipeline does by default."""
        uncond = uncond.expand(len(self))
        if self.time_ids is not None:
            uncond = replace(uncond, time_ids=self.time_ids)
        return cat([self, uncond])

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of `UNet2DConditionModel.forward` beside sample and timestep."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden.to(dtype)}
        if self.pooled is not None:
            # Time ids as integers: no autocast or FSDP input cast (bf16 holds integers exactly only up to 256)
            # reaches them; the UNet's own time projection turns them into float32 features.
            time_ids = self.time_ids.round().long()
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": time_ids}
        return kwargs


def cat(parts: Sequence[Conditioning]) -> Conditioning:
    """Rows of several conditionings, in order (torch.cat on each part)."""
    first = parts[0]
    return replace(first, **{name: torch.cat([getattr(p, name) for p in parts]) for name in first._parts()})


def as_conditioning(text: torch.Tensor | Conditioning) -> Conditioning:
    """A bare hidden-state tensor (SD) as a Conditioning; a Conditioning as it is."""
    return text if isinstance(text, Conditioning) else Conditioning(hidden=text)
