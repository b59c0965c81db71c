"""Helpers the tests share."""

from __future__ import annotations

from pathlib import Path


def build_args(teacher_dir, source, out, *extra) -> list[str]:
    return ["build-shards", "--teacher", str(teacher_dir), "--source", str(source), "--out", str(out),
            "--resolution", "32", "--batch-size", "4", "--shard-size", "5", *map(str, extra)]


def read_records(folder: Path) -> dict:
    """key -> Record over every shard of a folder (asserting keys are unique)."""
    import webdataset as wds

    from shards.format import Record
    from shards.manifest import read_manifest

    records = {}
    for shard in read_manifest(folder):
        for sample in wds.tarfile_samples([{"url": str(folder / shard.file)}]):
            record = Record.decode(sample)
            assert record.key not in records
            records[record.key] = record
    return records
