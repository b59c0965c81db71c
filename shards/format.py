"""The shard record format (schema version 2): one WebDataset sample per noised latent.

Members of a sample with key K (no dots in K):
- K.safetensors: float16 tensors `zt` (C x h x w, already times the VAE scaling factor) and the guidance
  ingredients, `eps_cond` + `eps_uncond` (kind "cfg") or `eps` + `grad` (kind "classifier"),
  optionally `z0` and `noise` (built with --store-clean).
- K.txt: the caption, UTF-8.
- K.json: {"t": int, "caption": str, "source_key": str, "micro": [6 ints], ...}. "micro" (since version 2) is
  the sample's micro-conditioning: original height and width, crop top and left (in the image resized so its
  short side is the resolution), target height and width; SDXL's UNet takes it as `add_time_ids`.
Version 1 is version 2 without "micro"; readers read both.
No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
TENSORS_BY_KIND = {"cfg": ("eps_cond", "eps_uncond"), "classifier": ("eps", "grad")}
CLEAN_TENSORS = ("z0", "noise")
STORED_DTYPE = torch.float16
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def record_key(source_key: str) -> str:
    """A stable WebDataset key from a source key: unsafe characters become '_', plus a short hash if any did."""
    safe = _UNSAFE.sub("_", source_key)
    if safe == source_key:
        return safe
    return f"{safe}_{hashlib.sha256(source_key.encode()).hexdigest()[:8]}"


def recorded_micro(metas: list[dict[str, Any]]) -> torch.Tensor | None:
    """The (B, 6) micro-conditioning of a batch of records' JSON, or None when they carry none (version 1)."""
    micro = [meta.get("micro") for meta in metas]
    return None if None in micro else torch.tensor(micro)


def tensor_names(kind: str, store_clean: bool) -> tuple[str, ...]:
    if kind not in TENSORS_BY_KIND:
        raise ValueError(f"unknown shard kind {kind!r}; expected one of {sorted(TENSORS_BY_KIND)}")
    return ("zt",) + TENSORS_BY_KIND[kind] + (CLEAN_TENSORS if store_clean else ())


@dataclass
class Record:
    key: str
    tensors: dict[str, torch.Tensor]
    t: int
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        """The WebDataset sample: {"__key__", "safetensors", "txt", "json"} as bytes."""
        tensors = {name: value.detach().to("cpu", STORED_DTYPE).contiguous() for name, value in self.tensors.items()}
        meta = {"t": int(self.t), "caption": self.caption, **self.meta}
        return {
            "__key__": self.key,
            "safetensors": save_safetensors(tensors),
            "txt": self.caption.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        }

    @classmethod
    def decode(cls, sample: dict[str, Any]) -> "Record":
        """Inverse of encode; tensors stay float16."""
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8")
        t = int(meta.pop("t"))
        meta.pop("caption", None)
        return cls(key=sample["__key__"], tensors=load_safetensors(sample["safetensors"]), t=t, caption=caption, meta=meta)
