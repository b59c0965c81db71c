"""Prompt lists for data-free distillation: read once, then drawn by position, so a resume redraws the same ones.

A prompt file is a text file with one prompt per line (the Aesthetics6+ prompt files are this), or a table or JSON
list with a caption column (`diffusion.prompt_files`). Empty and undecodable lines are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.prompt_files import read_prompt_file
from trainer.data import position_generator


@dataclass
class PromptList:
    prompts: list[str]
    empty_skipped: int
    sha256: str
    undecodable_skipped: int = 0  # lines whose bytes are neither UTF-8 nor UTF-16 text


def read_prompts(path: str | Path, column: str = "caption") -> PromptList:
    """The prompts of a text, csv/tsv, parquet or JSON prompt file (diffusion.prompt_files)."""
    listed = read_prompt_file(path, column)
    return PromptList(listed.prompts, listed.info["empty_skipped"], listed.info["sha256"],
                      listed.info["undecodable_skipped"])


class PromptSampler:
    """Prompt number p of the run (p counts over ranks, micro-batches and samples) is entry p % N of a
    permutation of the list drawn anew for each epoch p // N: every prompt once per epoch, in a seeded order."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed = prompts, seed
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._order = torch.randperm(len(self.prompts), generator=position_generator("prompts", self.seed, epoch))
            self._epoch = epoch
        return self._order

    def batch(self, first: int, size: int) -> list[str]:
        out = []
        for p in range(first, first + size):
            epoch, index = divmod(p, len(self.prompts))
            out.append(self.prompts[int(self._permutation(epoch)[index])])
        return out
