"""Input sources, cut into units of work that ranks share and that name the output shards.

- img2dataset output (LAION): tar files of KEY.jpg|png|webp + KEY.txt + KEY.json; one unit per tar.
  `--source` is a folder holding them, a glob, or a brace pattern ("laion/{00000..00099}.tar").
- a folder of images with sidecar captions (IMAGE.txt beside IMAGE.jpg), or a csv/parquet table with
  a file column (relative to the table's folder) and a caption column; units of `shard_size` entries.
Reading never raises on bad data: a sample that can't be read carries the reason it is skipped.
"""

from __future__ import annotations

import glob
import itertools
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

from diffusion.errors import UserError
from shards.format import record_key

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class RawSample:
    source_key: str
    image: bytes | None
    caption: bytes | None
    skip: str | None = None


@dataclass(frozen=True)
class TarUnit:
    """One img2dataset tar; samples are consecutive members sharing a key."""

    name: str
    path: Path
    limit: int | None = None

    def samples(self) -> Iterator[RawSample]:
        return itertools.islice(self._samples(), self.limit)

    def count(self) -> int:
        """Entries this unit yields: its limit when it has one, else one per key in the tar's headers."""
        if self.limit is not None:
            return self.limit
        keys = set()
        try:
            with tarfile.open(self.path) as tar:
                for member in tar:
                    keys.add(_split_member(member.name)[0])
        except (tarfile.TarError, OSError, EOFError):
            pass
        return len(keys)

    def _samples(self) -> Iterator[RawSample]:
        group: dict[str, bytes] = {}
        key = None
        try:
            with tarfile.open(self.path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = _split_member(member.name)
                    if key is not None and member_key != key:
                        yield self._sample(key, group)
                        group = {}
                    key = member_key
                    group[extension] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            if key is not None:
                yield RawSample(self._source_key(key), None, None, skip="truncated_tar")
            return
        if key is not None:
            yield self._sample(key, group)

    def _source_key(self, key: str) -> str:
        return f"{self.name}/{key}"

    def _sample(self, key: str, group: dict[str, bytes]) -> RawSample:
        image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        return RawSample(self._source_key(key), image, group.get("txt"),
                         skip=None if image is not None else "missing_image")


@dataclass(frozen=True)
class FolderEntry:
    source_key: str
    image_path: Path
    caption: str | None = None  # from a table; else read from the sidecar IMAGE.txt


@dataclass(frozen=True)
class FolderUnit:
    name: str
    entries: tuple[FolderEntry, ...]
    limit: int | None = None

    def count(self) -> int:
        return len(self.entries[: self.limit])

    def samples(self) -> Iterator[RawSample]:
        for entry in self.entries[: self.limit]:
            yield _read_entry(entry)


def _read_entry(entry: FolderEntry) -> RawSample:
    try:
        image = entry.image_path.read_bytes()
    except OSError:
        return RawSample(entry.source_key, None, None, skip="missing_image")
    if entry.caption is not None:
        return RawSample(entry.source_key, image, entry.caption.encode("utf-8"))
    try:
        caption = entry.image_path.with_suffix(".txt").read_bytes()
    except OSError:
        caption = None
    return RawSample(entry.source_key, image, caption)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename; extension = the rest, lower-cased."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def list_units(source: str, shard_size: int, file_column: str = "file", caption_column: str = "caption") -> list:
    """The source's units in a deterministic order."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".csv", ".parquet"):
        return _chunk(_table_entries(path, file_column, caption_column), shard_size)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if tars:
            return _tar_units(tars)
        return _chunk(_sidecar_entries(path), shard_size)
    matches = sorted({Path(p) for pattern in braceexpand(source) for p in glob.glob(os.path.expanduser(pattern))})
    if not matches:
        raise UserError(f"--source {source!r} matches no tar file, folder or csv/parquet table")
    return _tar_units(matches)


def limit_units(units: list, samples: int | None) -> list:
    """Cap the first `samples` source entries, in order (bad entries among them are skipped, not replaced)."""
    if samples is None:
        return units
    limited, left = [], samples
    for unit in units:
        if left <= 0:
            break
        count = unit.count()
        limited.append(type(unit)(**{**unit.__dict__, "limit": min(count, left)}))
        left -= count
    return limited


def _tar_units(tars: list[Path]) -> list[TarUnit]:
    names = [record_key(p.name.split(".")[0]) for p in tars]
    if len(set(names)) != len(names):
        names = [f"{i:05d}_{n}" for i, n in enumerate(names)]
    return [TarUnit(name, p) for name, p in zip(names, tars)]


def _chunk(entries: list[FolderEntry], shard_size: int) -> list[FolderUnit]:
    if not entries:
        raise UserError("the source holds no images")
    return [FolderUnit(f"part{i // shard_size:05d}", tuple(entries[i : i + shard_size]))
            for i in range(0, len(entries), shard_size)]


def _sidecar_entries(folder: Path) -> list[FolderEntry]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    return [FolderEntry(str(p.relative_to(folder).with_suffix("")), p) for p in images]


def _table_entries(table: Path, file_column: str, caption_column: str) -> list[FolderEntry]:
    import pyarrow.csv
    import pyarrow.parquet

    data = pyarrow.parquet.read_table(table) if table.suffix == ".parquet" else pyarrow.csv.read_csv(table)
    for column in (file_column, caption_column):
        if column not in data.column_names:
            raise UserError(f"{table} has no column {column!r} (columns: {', '.join(data.column_names)})")
    files, captions = data.column(file_column).to_pylist(), data.column(caption_column).to_pylist()
    return [FolderEntry(str(Path(f).with_suffix("")), table.parent / f, c if c is not None else "")
            for f, c in zip(files, captions) if f is not None]
