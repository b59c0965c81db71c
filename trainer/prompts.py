"""Prompt lists for data-free distillation: read once, then drawn by position, so a resume redraws the same ones.

A prompt file is a text file with one prompt per line (the Aesthetics6+ prompt files are this), or a parquet or
csv table with a caption column. Empty lines are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.errors import UserError
from diffusion.files import sha256_file
from trainer.data import position_generator


@dataclass
class PromptList:
    prompts: list[str]
    empty_skipped: int
    sha256: str


def _table_column(path: Path, column: str) -> list:
    import pyarrow.csv
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path) if path.suffix == ".parquet" else pyarrow.csv.read_csv(path)
    except Exception as error:  # pyarrow's own errors for a malformed table
        raise UserError(f"--prompts {path}: cannot read it as a {path.suffix[1:]} table ({error})") from None
    if column not in table.column_names:
        raise UserError(f"--prompts {path} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                        "pick one with --prompt-column")
    return table.column(column).to_pylist()


def read_prompts(path: str | Path, column: str = "caption") -> PromptList:
    """One prompt per non-empty line of a text file, or the `column` of a .parquet/.csv table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if path.suffix in (".parquet", ".csv"):
        raw = ["" if value is None else str(value) for value in _table_column(path, column)]
    else:
        raw = path.read_text(encoding="utf-8").splitlines()
    prompts = [p.strip() for p in raw if p.strip()]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompts")
    return PromptList(prompts, len(raw) - len(prompts), sha256_file(path))


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
