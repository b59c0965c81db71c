"""Atomic writers: a shard is written under a temporary name and renamed only once complete."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from shards.format import Record

TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardInfo:
    """One manifest row."""

    file: str
    samples: int
    bytes: int
    sha256: str


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.bytes

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class ShardWriter:
    """Write Records into `path` atomically (tar written to path.tmp, renamed on `finish`).

    The tar is reproducible: fixed mtime, owner and mode, so the same records give the same sha256.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self._file = _HashingFile(self._tmp)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, user="shards", group="shards")
        self.samples = 0

    def write(self, record: Record) -> None:
        self._tar.write(record.encode())
        self.samples += 1

    def finish(self) -> ShardInfo:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.path)
        return ShardInfo(self.path.name, self.samples, self._file.bytes, self._file.sha256.hexdigest())

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
