"""`pipeline inspect DIR`: validate a shard folder end to end and summarise it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from shards.format import STORED_DTYPE, Record
from shards.manifest import read_dataset_info, read_manifest, schema_problem
from shards.reader import describe
from shards.verify import file_problems
from shards.writer import ShardInfo

RECORD_FIELDS = {"tensors", "latent_shape", "t_min", "t_max"}  # what dataset.json must say to check a record by


def _check_record(record: Record, info: dict[str, Any], problems: list[str]) -> None:
    expected = set(info["tensors"])
    if set(record.tensors) != expected:
        problems.append(f"{record.key}: tensors {sorted(record.tensors)} (expected {sorted(expected)})")
        return
    for name, value in record.tensors.items():
        if list(value.shape) != info["latent_shape"] or value.dtype != STORED_DTYPE:
            problems.append(f"{record.key}/{name}: {value.dtype} {list(value.shape)} (expected float16 {info['latent_shape']})")
        elif not torch.isfinite(value).all():
            problems.append(f"{record.key}/{name}: NaN or Inf")
    if not info["t_min"] <= record.t <= info["t_max"]:
        problems.append(f"{record.key}: t = {record.t} outside [{info['t_min']}, {info['t_max']}]")


def _read_shard(folder: Path, shard: ShardInfo, info: dict[str, Any], problems: list[str], keys: Counter,
                t_values: list[int]) -> None:
    """Check every record of one shard; a shard that cannot be read to its end is a problem, not a crash."""
    count = 0
    try:
        for sample in wds.tarfile_samples([{"url": str(folder / shard.file)}]):
            count += 1
            keys[sample["__key__"]] += 1
            try:
                record = Record.decode(sample)
            except Exception as error:  # bad safetensors, JSON or UTF-8, a missing member
                problems.append(f"{shard.file}: record {sample['__key__']} does not decode ({describe(error)})")
                continue
            if RECORD_FIELDS <= info.keys():
                _check_record(record, info, problems)
            t_values.append(record.t)
    except Exception as error:  # truncated, not a tar, a key twice in a row
        problems.append(f"{shard.file}: unreadable after {count} records ({describe(error)})")
        return
    if count != shard.samples:
        problems.append(f"{shard.file}: {count} samples (manifest says {shard.samples})")


def inspect_folder(folder: str | Path) -> dict[str, Any]:
    """Counts, checksums, schema and finiteness of every record; `problems` lists what is wrong (empty: valid)."""
    folder = Path(folder)
    info = read_dataset_info(folder)
    shards = read_manifest(folder)
    problems = file_problems(folder, verify=True)
    if (problem := schema_problem(info, "this tool")) is not None:
        problems.append(problem)
    if missing := sorted(RECORD_FIELDS - info.keys()):
        problems.append(f"dataset.json: no {', '.join(missing)} (records not checked against it)")
    keys: Counter = Counter()
    t_values: list[int] = []
    for shard in shards:
        if (folder / shard.file).is_file():
            _read_shard(folder, shard, info, problems, keys, t_values)
    problems += [f"{key}: {n} copies" for key, n in keys.items() if n > 1]
    total = sum(keys.values())
    return {
        "folder": str(folder), "kind": info.get("kind"), "guidance": info.get("guidance", {}).get("name"),
        "teacher_fingerprint": info.get("teacher", {}).get("fingerprint"), "samples": total, "shards": len(shards),
        "bytes": sum(s.bytes for s in shards), "latent_shape": info.get("latent_shape"),
        "tensors": info.get("tensors"), "t_range": [min(t_values), max(t_values)] if t_values else None,
        "skipped": info.get("skipped", {}), "problems": problems, "valid": not problems,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['folder']}: {'valid' if summary['valid'] else 'INVALID'}",
        f"  kind {summary['kind']} (guidance {summary['guidance']}), teacher {str(summary['teacher_fingerprint'])[:12]}",
        f"  {summary['samples']} samples in {summary['shards']} shards, {summary['bytes'] / 2**20:.1f} MiB, "
        f"latent {summary['latent_shape']}, tensors {', '.join(summary['tensors'] or [])}, t in {summary['t_range']}",
        f"  skipped inputs: {summary['skipped'] or 'none'}",
    ]
    lines += [f"  problem: {p}" for p in summary["problems"][:20]]
    if len(summary["problems"]) > 20:
        lines.append(f"  ... and {len(summary['problems']) - 20} more problems")
    return "\n".join(lines)
