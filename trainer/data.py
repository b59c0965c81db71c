"""Micro-batches for one rank, streamed from a shard folder: deterministic, and resumable from any position.

The stream is a sequence of passes. In epoch mode a pass is one epoch of the reader (every rank gets the same
number of samples, so the same number of micro-batches, and nothing hangs at a collective). In resampled mode
a pass is `checkpoint_every` optimiser steps drawn with a seed of their own, so a resume from a periodic
checkpoint starts a fresh pass and replays nothing. Position = the index of the micro-batch; resuming
mid-pass re-reads and drops that pass's first micro-batches (bounded by the pass length).
Samples are batched in the main process, so every rank's count is exact whatever its DataLoader workers hold.
"""

from __future__ import annotations

import hashlib
import itertools
import signal
from typing import Any, Iterator

import torch

from shards.format import recorded_micro
from shards.reader import ShardStream


def position_generator(tag: str, seed: int, *position: int) -> torch.Generator:
    """A CPU generator that is a function of (tag, seed, position) only: resumes and ranks redraw exactly."""
    digest = hashlib.sha256(":".join([tag, str(seed), *map(str, position)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _ignore_interrupts(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the main process checkpoints and stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(samples: list[dict[str, Any]], tensor_names: tuple[str, ...]) -> dict[str, Any]:
    batch: dict[str, Any] = {name: torch.stack([s[name] for s in samples]) for name in tensor_names}
    batch["t"] = torch.stack([s["t"] for s in samples])
    batch["caption"] = [s["caption"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    batch["micro"] = recorded_micro([s["meta"] for s in samples])
    return batch


class MicroBatches:
    """Yields collated micro-batches of `batch_size` for this rank, from micro-batch index `start` on."""

    def __init__(self, stream: ShardStream, batch_size: int, tensor_names: tuple[str, ...], *,
                 resampled_pass_length: int, num_workers: int = 2):
        self.stream, self.batch_size, self.tensor_names = stream, batch_size, tensor_names
        if stream.resampled:
            self.pass_length = resampled_pass_length
        else:
            self.pass_length = stream.samples_per_rank // batch_size
            if self.pass_length < 1:
                raise ValueError(
                    f"an epoch gives each rank {stream.samples_per_rank} samples, fewer than one batch of {batch_size}"
                )
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=num_workers, worker_init_fn=_ignore_interrupts if num_workers else None,
            prefetch_factor=4 * batch_size if num_workers else None,
        )

    def _pass(self, index: int) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(index)  # read by the workers when the iterator starts them
        samples = iter(self.loader)
        for _ in range(self.pass_length):
            chunk = list(itertools.islice(samples, self.batch_size))
            if len(chunk) < self.batch_size:
                raise RuntimeError(f"pass {index} ended after a short batch: the shard reader yielded too few samples")
            yield collate(chunk, self.tensor_names)

    def from_position(self, start: int) -> Iterator[dict[str, Any]]:
        pass_index, offset = divmod(start, self.pass_length)
        while True:
            yield from itertools.islice(self._pass(pass_index), offset, None)
            pass_index, offset = pass_index + 1, 0
