"""Streaming reader for a shard folder, for the trainer: split by rank and DataLoader worker, shuffled, float16.

Two modes:
- resampled (default): each (rank, worker) stream draws shards at random with its own seed, forever; the loop
  decides when to stop. No rank can run out before another, so nothing hangs.
- epoch: shards are dealt round-robin to the streams and cycled, and every rank yields exactly
  `samples_per_rank` samples (total // world_size unless given), so ranks with fewer shards do not hang
  the others at a collective; a few samples repeat or drop at the epoch boundary (as open_clip does).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds

from shards.format import Record
from shards.manifest import check_compatible, read_dataset_info, read_manifest


class ShardStream(torch.utils.data.IterableDataset):
    """Yields dicts: key, t (int64 tensor), caption, meta, and the float16 tensors of the record."""

    def __init__(
        self,
        folder: str | Path,
        *,
        teacher_fingerprint: str | None = None,
        kind: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = True,
        samples_per_rank: int | None = None,
    ):
        self.folder = Path(folder)
        self.info = read_dataset_info(self.folder)
        check_compatible(self.info, teacher_fingerprint=teacher_fingerprint, kind=kind)
        self.shards = [s for s in read_manifest(self.folder) if s.samples > 0]
        if not self.shards:
            raise ValueError(f"{self.folder} holds no samples")
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        total = sum(s.samples for s in self.shards)
        self.samples_per_rank = samples_per_rank if samples_per_rank is not None else total // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self) -> tuple[int, int, int]:
        """(stream index, number of streams, this worker's index within the rank)."""
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return self.rank * workers + worker_id, self.world_size * workers, worker_id

    def _urls(self, rng: random.Random, stream: int, streams: int) -> Iterator[dict[str, str]]:
        files = [str(self.folder / s.file) for s in self.shards]
        if self.resampled:
            while True:
                yield {"url": rng.choice(files)}
        order = files[:]
        random.Random(self.seed + self.epoch).shuffle(order)
        mine = [order[i % len(order)] for i in range(stream, max(len(order), streams), streams)]
        for url in itertools.cycle(mine):
            yield {"url": url}

    def _quota(self, workers_stream: int, streams: int) -> int | None:
        if self.resampled:
            return None
        workers = streams // self.world_size
        base, extra = divmod(self.samples_per_rank, workers)
        return base + (1 if workers_stream < extra else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream, streams, worker_id = self._stream()
        rng = random.Random(hash((self.seed, self.epoch, stream)))
        samples = wds.tarfile_samples(self._urls(rng, stream, streams))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        decoded = map(_as_item, samples)
        quota = self._quota(worker_id, streams)
        return decoded if quota is None else itertools.islice(decoded, quota)


def _as_item(sample: dict[str, Any]) -> dict[str, Any]:
    record = Record.decode(sample)
    return {"key": record.key, "t": torch.tensor(record.t), "caption": record.caption, "meta": record.meta,
            **record.tensors}
