"""Input sources, cut into units of work that ranks share and that name the output shards.

- img2dataset output (LAION): tar files of KEY.jpg|png|webp + KEY.txt + KEY.json; one unit per tar.
  `--source` is a folder holding them, a glob, or a brace pattern ("laion/{00000..00099}.tar").
- a folder of images with sidecar captions (IMAGE.txt beside IMAGE.jpg), or a csv/parquet table with
  a file column (relative to the table's folder) and a caption column; units of `shard_size` entries.
Reading never raises on bad data: a sample that can't be read carries the reason it is skipped, and a tar that
holds no sample yields one sample carrying why. Source keys are unique, so record keys are: a tar key that
reappears after other keys is skipped (duplicate_key); in folders and tables see `source_keys`.
"""

from __future__ import annotations

import glob
import itertools
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterator

from braceexpand import braceexpand

from diffusion.errors import UserError
from diffusion.text_files import text_encoding
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
        """Entries this unit yields: its limit when it has one, else one per run of members sharing a key in the
        tar's headers (at least one: a tar that holds no sample yields its skip)."""
        if self.limit is not None:
            return self.limit
        keys = []
        try:
            with tarfile.open(self.path) as tar:
                for member in tar:
                    if member.isfile():
                        keys.append(_split_member(member.name)[0])
        except (tarfile.TarError, OSError, EOFError):
            pass
        return max(_count_runs(keys), 1)

    def _samples(self) -> Iterator[RawSample]:
        seen: set[str] = set()
        for key, group, skip in _read_groups(self.path):
            if skip is None and key in seen:
                skip = "duplicate_key"  # the key reappears after other keys: the first sample with it wins
            seen.add(key)
            yield self._sample(key, group, skip)

    def _sample(self, key: str, group: dict[str, bytes], skip: str | None) -> RawSample:
        image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        if skip is None and image is None:
            skip = "missing_image"
        return RawSample(f"{self.name}/{key}", image, group.get("txt"), skip=skip)


def _read_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {extension: bytes}, None) per run of consecutive file members sharing a key. A tar that yields no run
    gives one ("", {}, reason); a truncated tar's last run comes with "truncated_tar" (it may be incomplete)."""
    try:
        tar = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError, EOFError):
        yield "", {}, "empty_tar" if _is_empty(path) else "not_a_tar"
        return
    key, group, complete = None, {}, False
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = _split_member(member.name)
                if key is not None and member_key != key:
                    yield key, group, None
                    group = {}
                key = member_key
                group[extension] = tar.extractfile(member).read()
            complete = _ended_on_end_block(tar)
        except (tarfile.TarError, OSError, EOFError):
            pass
    if key is None:
        yield "", {}, "empty_tar" if complete else "truncated_tar"
    else:
        yield key, group, None if complete else "truncated_tar"


def _ended_on_end_block(tar: tarfile.TarFile) -> bool:
    """Whether reading stopped on the end-of-archive block. A tar cut on a 512-byte boundary just ends, which
    tarfile takes for a complete archive; then nothing was read past the last member (offset == position)."""
    return tar.fileobj.tell() > tar.offset


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _count_runs(keys: list[str]) -> int:
    """Runs of equal consecutive keys."""
    return sum(1 for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key)


@dataclass(frozen=True)
class FolderEntry:
    source_key: str
    image_path: Path | None  # None: a table row without a file
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
        image = entry.image_path.read_bytes() if entry.image_path is not None else None
    except OSError:
        image = None
    if image is None:
        return RawSample(entry.source_key, None, None, skip="missing_file")
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


def source_keys(files: list[str]) -> list[str]:
    """A unique source key per image path, in order: the path without its extension; with it when another image
    shares that stem (a.jpg and a.png); and `#k` on the k-th repeat (a table with one row per caption)."""
    stems = [str(PurePath(f).with_suffix("")) for f in files]
    owners: dict[str, set[str]] = {}
    for file, stem in zip(files, stems):
        owners.setdefault(stem, set()).add(file)
    return _number_repeats([file if len(owners[stem]) > 1 else stem for file, stem in zip(files, stems)])


def _number_repeats(keys: list[str]) -> list[str]:
    """The first of equal keys stays as it is, the k-th repeat becomes KEY#k (or the next free number)."""
    taken, repeats, unique = set(), Counter(), []
    for key in keys:
        new = key
        while new in taken:
            repeats[key] += 1
            new = f"{key}#{repeats[key]}"
        taken.add(new)
        unique.append(new)
    return unique


def _sidecar_entries(folder: Path) -> list[FolderEntry]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    keys = source_keys([str(p.relative_to(folder)) for p in images])
    return [FolderEntry(key, p) for key, p in zip(keys, images)]


def _table_entries(table: Path, file_column: str, caption_column: str) -> list[FolderEntry]:
    """One entry per row; a row without a file stays an entry (skipped as missing_file), a null caption is ""."""
    data = _read_table(table, (file_column, caption_column))
    for column in (file_column, caption_column):
        if column not in data.column_names:
            raise UserError(f"{table} has no column {column!r} (columns: {', '.join(data.column_names)})")
    files = [_table_file(value) for value in data.column(file_column).to_pylist()]
    captions = ["" if c is None else str(c) for c in data.column(caption_column).to_pylist()]
    keys = iter(source_keys([f for f in files if f is not None]))
    return [FolderEntry(next(keys), table.parent / f, c) if f is not None else FolderEntry("", None, c)
            for f, c in zip(files, captions)]


def _table_file(value) -> str | None:
    """A table cell's path, normalised (./a.jpg is a.jpg); None when the cell names no file (null, empty)."""
    path = PurePath(str(value)) if value is not None else None
    return str(path) if path is not None and path.name else None


def _read_table(table: Path, text_columns: tuple[str, ...]):
    """The csv (UTF-8 or UTF-16, with or without a BOM; `text_columns` read as text) or parquet table."""
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if table.suffix == ".parquet":
            return pyarrow.parquet.read_table(table)
        return pyarrow.csv.read_csv(
            table, read_options=pyarrow.csv.ReadOptions(encoding=_csv_encoding(table)),
            convert_options=pyarrow.csv.ConvertOptions(column_types={c: pyarrow.string() for c in text_columns}))
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {table}: {str(error).strip().splitlines()[0]}") from None


def _csv_encoding(table: Path) -> str:
    """pyarrow's name for the csv's encoding (diffusion.text_files): its own UTF-8 reader skips a UTF-8 BOM,
    Python's "utf-16" codec reads a UTF-16 BOM."""
    with open(table, "rb") as file:
        encoding, bom = text_encoding(file.read(4096))
    if encoding == "utf-8":
        return "utf8"
    return "utf-16" if bom else encoding
