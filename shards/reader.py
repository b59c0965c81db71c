"""Streaming reader for a shard folder, for the trainer: split by rank and DataLoader worker, shuffled, float16.

Two modes:
- resampled (default): each (rank, worker) stream draws shards at random with its own seed, forever; the loop
  decides when to stop. No rank can run out before another, so nothing hangs.
- epoch: shards are dealt round-robin to ranks, then to DataLoader workers; each pass over a worker's shards
  is shuffled on its own, and every rank yields exactly `samples_per_rank` samples (total // world_size
  unless given), so ranks with fewer samples do not hang the others at a collective: a few samples repeat
  or drop at the epoch boundary (as open_clip does). With one rank, an epoch is every record once.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds

from diffusion.errors import UserError, one_line
from shards.format import Record
from shards.manifest import check_compatible, read_dataset_info, read_manifest


class UnreadableShard(UserError):
    """A shard that fails while being read (truncated, replaced, a record that does not decode), named.

    Raised in a DataLoader worker, it reaches the main process re-created by torch from its traceback text
    ("Caught UnreadableShard in DataLoader worker ..."); the constructor keeps just the line naming the shard.
    """

    def __init__(self, message: str):
        super().__init__(message.strip().splitlines()[-1].rpartition(f"{UnreadableShard.__name__}: ")[2])


def describe(error: BaseException) -> str:
    """One line for an error met reading a shard, without the stream webdataset appends (' @ <stream>')."""
    return one_line(error).split(" @ <", 1)[0]


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of one shard; any failure to read it is an UnreadableShard naming it."""
    try:
        yield from wds.tarfile_samples([{"url": url}])
    except Exception as error:
        raise _unreadable(url, "is unreadable", error) from error


def _unreadable(url: str, what: str, error: BaseException) -> UnreadableShard:
    return UnreadableShard(f"shard {url} {what} ({describe(error)}); run `pipeline inspect {Path(url).parent}`")


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
            raise UserError(f"{self.folder} holds no samples")
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        total = sum(s.samples for s in self.shards)
        self.samples_per_rank = samples_per_rank if samples_per_rank is not None else total // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _deal(self, worker_id: int, workers: int) -> tuple[list[str], int]:
        """Epoch mode: (this worker's shards, how many samples it yields).

        Shards are dealt round-robin to ranks from an epoch-seeded order, then to the rank's workers
        (wrapping when there are fewer shards than takers). The rank yields exactly samples_per_rank: the
        difference from what its shards hold is spread over its workers as repeats or cuts.
        """
        order = list(self.shards)
        random.Random(self.seed + self.epoch).shuffle(order)
        mine = [order[i % len(order)] for i in range(self.rank, max(len(order), self.world_size), self.world_size)]
        theirs = [[mine[i % len(mine)] for i in range(w, max(len(mine), workers), workers)] for w in range(workers)]
        natural = [sum(s.samples for s in shards) for shards in theirs]
        base, extra = divmod(self.samples_per_rank - sum(natural), workers)
        quota = natural[worker_id] + base + (1 if worker_id < extra else 0)
        return [str(self.folder / s.file) for s in theirs[worker_id]], max(quota, 0)

    def _shuffled(self, urls, rng: random.Random) -> Iterator[dict[str, Any]]:
        samples = itertools.chain.from_iterable(map(shard_samples, urls))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        return samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker_id)))
        if self.resampled:
            files = [str(self.folder / s.file) for s in self.shards]
            return map(_as_item, self._shuffled(iter(lambda: rng.choice(files), None), rng))
        mine, quota = self._deal(worker_id, workers)
        passes = itertools.chain.from_iterable(self._shuffled(mine, rng) for _ in itertools.count())
        return itertools.islice(map(_as_item, passes), quota)


def _as_item(sample: dict[str, Any]) -> dict[str, Any]:
    try:
        record = Record.decode(sample)
    except Exception as error:
        raise _unreadable(sample["__url__"], f"holds a record that does not decode, {sample['__key__']}",
                          error) from error
    return {"key": record.key, "t": torch.tensor(record.t), "caption": record.caption, "meta": record.meta,
            **record.tensors}
