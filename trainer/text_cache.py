"""Caption -> text-encoder output (a `Conditioning`, one row per caption), with the frozen encoder run once per
distinct caption of a batch and a small LRU cache across batches (captions repeat: the empty prompt, duplicated
LAION captions, small worlds)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from diffusion.conditioning import Conditioning, as_conditioning, cat


class TextEmbeddingCache:
    def __init__(self, encode: Callable[[list[str]], Conditioning | torch.Tensor], max_entries: int = 1024):
        self.encode, self.max_entries = encode, max_entries
        self.entries: OrderedDict[str, Conditioning] = OrderedDict()
        self.encoded = 0  # captions sent to the encoder (for tests and logs)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> Conditioning:
        missing = list(dict.fromkeys(c for c in captions if c not in self.entries))
        fresh = dict(zip(missing, as_conditioning(self.encode(missing)).rows())) if missing else {}
        self.encoded += len(missing)
        rows = [fresh[c] if c in fresh else self.entries[c] for c in captions]
        for caption in captions:
            if caption in fresh:
                self.entries[caption] = fresh[caption]
            self.entries.move_to_end(caption)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return cat(rows)
